"""Switch SAE: encoder compute per token scales with the expert size, not the total width.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/switch_speed.py

Fixed expert size m and k; the number of experts N (so the total width N*m) grows. Prints the
median encode time per token for Switch and for a dense TopK of the same total width, with the
analytic encoder FLOPs per token. Switch's time should stay roughly flat while TopK's grows ~N.
"""

import time

import torch

import saelab

torch.set_num_threads(1)
d_in, m, k, B = 256, 256, 16, 4096
x = torch.randn(B, d_in)
print(f"d_in={d_in}, expert size m={m}, k={k}, batch={B}")
print(
    f"{'N':>4} {'width':>7} {'switch us/tok':>14} {'topk us/tok':>12} {'switch enc FLOPs':>17} {'topk enc FLOPs':>15}"
)
for n in (2, 8, 32):
    sw = saelab.create({"architecture": "switch", "d_in": d_in, "d_sae": n * m, "k": k, "n_experts": n}).eval()
    tk = saelab.create({"architecture": "topk", "d_in": d_in, "d_sae": n * m, "k": k}).eval()
    times = {}
    for name, sae in (("switch", sw), ("topk", tk)):
        with torch.no_grad():
            sae.encode(x)
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                sae.encode(x)
                ts.append(time.perf_counter() - t)
        times[name] = sorted(ts)[2] / B * 1e6
    fl = sw.flops_per_token()
    print(
        f"{n:>4} {n * m:>7} {times['switch']:>14.2f} {times['topk']:>12.2f} {fl['router'] + fl['encoder']:>17,} "
        f"{fl['dense_topk_encoder']:>15,}"
    )
