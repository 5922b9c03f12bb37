"""Does ``partition(model, n_devices)`` choose a mesh at least as fast as the ones people publish?

For each case, in its own subprocess (so each peak RSS is that case's): the model is built on the
meta device in bf16 and captured once; ``partition(gm, n)`` (strategy "auto") searches every
``dp x tp x pp`` with tensor parallelism inside a node of 8, the micro-batches, the schedule and the
data-parallel mode; then every published configuration is evaluated by the same simulator with
``partition(gm, n, mesh=...)`` (its degrees pinned, the rest chosen as for auto). Both on
``device="h100"`` (989 TFLOP/s bf16 datasheet; matmuls at 75% of it, attention 55%, HBM 80%;
NVLink 450 GB/s per direction, 400 Gb/s InfiniBand per GPU), 80 GB per device, AdamW with mixed
precision (bf16 compute, fp32 master weights and moments: 18 B per parameter); every block's
activations recomputed in backward where a candidate does not fit otherwise (``recompute``).

MFU: the graph's forward + backward FLOPs of the global batch (attention included, recomputation
not) over step time x devices x 989 TFLOP/s. Published figures (ANCHORS.md) are measured on real
clusters, with activation checkpointing where memory needed it; they are listed for scale, the
comparison that counts is against the published mesh under the same simulator.

Writes ``benchmarks/results/auto.md`` and ``auto.json``. Run: ``python benchmarks/auto.py``
(``--only 8b-8`` for one case; ``--list`` for their names).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import _common  # noqa: F401 - puts the repository root on sys.path
from _common import RESULTS, md_table, peak_rss_bytes, write_result

H100_PEAK = 989e12

LLAMA = {  # layers, hidden, ffn, heads, kv heads (Llama 3 / 3.1 model card)
    "llama-3-8b": (32, 4096, 14336, 32, 8),
    "llama-3-70b": (80, 8192, 28672, 64, 8),
    "llama-3-405b": (126, 16384, 53248, 128, 8),
}

# name: model, devices, global batch (sequences), sequence length, published meshes [(label, mesh, dp mode, source)]
CASES = {
    "8b-8": ("llama-3-8b", 8, 8, 8192, [
        ("torchtitan FSDP", {"dp": 8}, "shard", "torchtitan Llama 3 8B: FSDP on 8-128 H100, 33-39% MFU"),
    ]),
    "8b-64": ("llama-3-8b", 64, 64, 8192, [
        ("torchtitan FSDP", {"dp": 64}, "shard", "torchtitan Llama 3 8B: FSDP on 8-128 H100, 33-39% MFU"),
        ("FSDP x TP8", {"dp": 8, "tp": 8}, "shard", "autoparallel's search space (FSDP x TP)"),
    ]),
    "70b-64": ("llama-3-70b", 64, 64, 4096, [
        ("torchtitan FSDP x TP8", {"dp": 8, "tp": 8}, "shard", "torchtitan Llama 3 70B: FSDP x TP8"),
    ]),
    "70b-512": ("llama-3-70b", 512, 512, 4096, [
        ("torchtitan FSDP x TP8", {"dp": 64, "tp": 8}, "shard", "torchtitan Llama 3 70B: FSDP32 x TP8 on 256"),
    ]),
    "405b-16k": ("llama-3-405b", 16384, 2048, 8192, [
        ("Llama 3 405B TP8 x PP16 x DP", {"dp": 128, "tp": 8, "pp": 16}, "shard",
         "Meta, Llama 3 paper: TP8 x PP16 x DP on 16,384 H100, 38-43% MFU"),
    ]),
    "gpt3-1k": ("gpt-3-175b", 1024, 1536, 2048, [
        ("Megatron TP8 x PP8", {"dp": 16, "tp": 8, "pp": 8}, "replicate", "Megatron-LM GPT-3 175B, 42-47% MFU"),
        ("Megatron TP8 x PP16", {"dp": 8, "tp": 8, "pp": 16}, "replicate",
         "Megatron-LM GPT-3 175B, the same model with 16 pipeline stages"),
    ]),
}


def build(name: str, batch: int, seq: int):
    """The model on the meta device (bf16) and one global batch of token ids."""
    import torch
    with torch.device("meta"):
        if name == "gpt-3-175b":
            from transformers import GPT2Config, GPT2LMHeadModel
            config = GPT2Config(n_layer=96, n_embd=12288, n_head=96, n_positions=seq, vocab_size=50257,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            model = GPT2LMHeadModel(config)
        else:
            from transformers import LlamaConfig, LlamaForCausalLM
            layers, hidden, ffn, heads, kv = LLAMA[name]
            config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                                 num_attention_heads=heads, num_key_value_heads=kv, vocab_size=128256,
                                 max_position_embeddings=seq,
                                 rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
            model = LlamaForCausalLM(config)
        model = model.to(torch.bfloat16)
        ids = torch.zeros(batch, seq, dtype=torch.long)
    return model, ids


def run_case(key: str) -> dict:
    """One case in this process: capture, auto search, published meshes."""
    from partitioner import partition
    from passes import capture
    from passes._keys import ESTIMATE

    model_name, n, batch, seq, published = CASES[key]
    model, ids = build(model_name, batch, seq)
    start = time.perf_counter()
    gm = capture(model, (ids,), {"use_cache": False}, dynamic=False)
    capture_s = time.perf_counter() - start
    start = time.perf_counter()
    auto = partition(gm, n, (ids,), {"use_cache": False}, device="h100")
    search_s = time.perf_counter() - start          # costing (estimate) included
    est = gm.meta[ESTIMATE]
    flops = est.flops + est.backward_flops
    n_params = sum(p.numel() for p in model.parameters())

    def row(plan) -> dict:
        c = plan.cost
        return {"label": _label(plan), "step_s": c.step_time_s, "mfu": flops / (c.step_time_s * n * H100_PEAK),
                "peak_gb": c.peak_bytes / 1e9, "bubble": c.bubble_fraction,
                "exposed": {a.axis: a.exposed_s for a in c.axes if a.exposed_s > 0}}

    out = {"case": key, "model": model_name, "devices": n, "batch": batch, "seq": seq, "params": n_params,
           "flops": flops, "capture_s": capture_s, "search_s": search_s, "candidates": len(auto.candidates),
           "fitting": sum(1 for c in auto.candidates if c.fits), "auto": row(auto), "published": []}
    for label, mesh, mode, source in published:
        start = time.perf_counter()
        try:
            plan = partition(gm, n, (ids,), {"use_cache": False}, device="h100", mesh=mesh, data_parallel=mode)
            result = row(plan)
        except ValueError as exc:                    # it does not fit: say what it needs
            result = {"label": _mesh_label(mesh, mode), "error": str(exc).splitlines()[0]}
        result.update(name=label, source=source, eval_s=time.perf_counter() - start)
        out["published"].append(result)
    out["peak_rss_gb"] = peak_rss_bytes() / 1e9
    return out


def _mesh_label(mesh: dict, mode: str) -> str:
    return " x ".join(f"{k}{mesh.get(k, 1)}" for k in ("dp", "tp", "pp")) + f", {mode}"


def _label(plan) -> str:
    d = plan.decisions
    text = " x ".join(f"{k}{d.mesh[k]}" for k in ("dp", "tp", "pp")) + f", m={d.n_microbatches}"
    if d.mesh["pp"] > 1:
        text += f", {d.schedule}" + (f" v={d.n_virtual}" if d.n_virtual > 1 else "")
    if d.mesh["dp"] > 1:
        text += f", {d.data_parallel}"
    if d.recompute:
        text += ", recompute"
    return text


def report(results: list[dict], wall_s: float) -> str:
    rows, notes = [], []
    for r in results:
        a = r["auto"]
        rows.append([r["case"], f"{r['model']} on {r['devices']:,} H100, batch {r['batch']} x {r['seq']}",
                     "**auto**: " + a["label"], f"{a['step_s']:.3f}", f"{a['mfu']:.1%}", f"{a['peak_gb']:.1f}",
                     "1.000", f"{r['capture_s']:.0f} + {r['search_s']:.0f} s ({r['candidates']} tried, {r['fitting']} fit)",
                     f"{r['peak_rss_gb']:.2f}"])
        for p in r["published"]:
            if "error" in p:
                rows.append(["", p["name"], p["label"], "does not fit", "", "", "", f"{p['eval_s']:.0f} s", ""])
                notes.append(f"{r['case']}, {p['name']}: {p['error']}")
                continue
            rows.append(["", p["name"], p["label"], f"{p['step_s']:.3f}", f"{p['mfu']:.1%}", f"{p['peak_gb']:.1f}",
                         f"{p['step_s'] / a['step_s']:.3f}", f"{p['eval_s']:.0f} s", ""])
    table = md_table(["case", "model / configuration", "mesh (auto's choice or the published degrees)",
                      "step s (sim)", "MFU (sim)", "peak GB/device", "step / auto", "capture + plan (or eval) time",
                      "peak RSS GB"], rows)
    sources = list(dict.fromkeys(f"{r['case']} {p['name']}: {p['source']}" for r in results for p in r["published"]))
    lines = ["# `strategy=\"auto\"` against published meshes (one simulator)", "",
             __doc__.split("\n\n", 1)[1].split("Writes")[0].strip(), "", table, ""]
    if notes:
        lines += ["Published meshes that do not fit 80 GB in this run, even with recomputation:", ""]
        lines += [f"- {n}" for n in notes] + [""]
    lines += ["Where each published configuration comes from (figures measured on real clusters):", ""]
    lines += [f"- {s}" for s in sources]
    lines += ["", "Reading the table:", "",
              "- Times: `capture` (static, on meta) + `partition` (costing the graph, sharding it for each tensor "
              "degree, the search, building the chosen plan's modules); a candidate whose compute alone cannot "
              "beat the best step found is rejected without cutting (`plan.candidates` says so).",
              "- `step / auto` compares meshes under one simulator: auto is never slower than a published mesh "
              "there by construction when that mesh is among its candidates; what it shows is how much the "
              "choice matters under this cost model, not that the published runs were slow.",
              "- The published meshes' simulated MFU sits well under what their authors measured. Their pipelines "
              "may now interleave (2 or 4 stages per rank, as Megatron-LM and Llama 3 ran them), which shortens "
              "the fill and drain; but the simulator still has no sequence parallelism and no overlap of "
              "tensor-parallel all-reduces with compute, and recomputes whole blocks (Megatron and torchtitan "
              "recompute selectively), so TP8 pays its all-reduces in full and recomputation costs a whole "
              "forward. Each of these favours meshes with less tensor parallelism, which is where auto goes.",
              "- Auto's own simulated MFU stays under the 75% the simulator allows GEMMs: attention at 55%, "
              "memory-bound ops, exposed tensor-parallel traffic and recomputation's extra forward."]
    lines += ["", f"Whole benchmark: {wall_s:.0f} s on this machine (2 cores, shared)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="case names (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--case", help=argparse.SUPPRESS)           # run one case here and print its JSON
    ap.add_argument("--report", action="store_true", help="rewrite auto.md from the last run's auto.json")
    args = ap.parse_args()
    if args.list:
        print("\n".join(CASES))
        return
    if args.report:
        saved = json.loads((RESULTS / "auto.json").read_text())
        write_result("auto.md", report(saved["cases"], saved["wall_s"]))
        return
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    start = time.perf_counter()
    results = []
    for key in args.only or list(CASES):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--case", key], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"case {key} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{key}: auto {results[-1]['auto']['label']} in {time.perf_counter() - t0:.0f} s", flush=True)
    wall = time.perf_counter() - start
    if args.only is None:
        (RESULTS / "auto.json").write_text(json.dumps({"wall_s": wall, "cases": results}, indent=1))
    text = report(results, wall)
    if args.only is None:
        write_result("auto.md", text)
    print(text)


if __name__ == "__main__":
    main()
