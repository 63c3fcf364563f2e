import statistics, torch, cola
from benchmarks import common as C
torch.manual_seed(0)
setups = {}
for name in ["lora", "cola-skip", "cola-noskip"]:
    model = C.build_model("opt-1.3b", dtype=torch.bfloat16, device="cuda", seed=0)
    data = C.make_batch(model.config.vocab_size, 16, 512, seed=0, device="cuda")
    if name == "lora":
        model, opt = C.setup_cola_lora(model, C.targets(model, "qv"))
    else:
        model, opt = C.setup_cola_chain(model, C.targets(model, "qv"), total_steps=10**6, links=1,
                                        skip_nonfinite=(name == "cola-skip"))
    setups[name] = C.train_step_fn(model, opt, data)
res = C.alternate(setups, rounds=15, warmup=2, device="cuda")
for k, v in res.items():
    print(k, "median ms", round(1e3 * statistics.median(v), 2), "min", round(1e3 * min(v), 2))
print("cola-skip/lora", statistics.median(res["cola-skip"]) / statistics.median(res["lora"]))
print("cola-noskip/lora", statistics.median(res["cola-noskip"]) / statistics.median(res["lora"]))
