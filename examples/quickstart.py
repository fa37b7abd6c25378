"""Train a TopK SAE on a ground-truth toy world, check it against the truth, save and reload it.

.venv/bin/python examples/quickstart.py
"""

import torch

import saelab
from saelab.evals import ground_truth_recovery, reconstruction_metrics
from saelab.toys import ToySource, World

world = World({"n_features": 256, "d": 64, "firing_prob": 0.02, "magnitude_std": 0.2})
print(f"true L0 = {world.expected_l0:.1f}, interference = {world.interference()}")

result = saelab.train(
    {"architecture": "topk", "d_in": 64, "d_sae": 256, "k": 5},
    ToySource(world, batch_size=1024),
    {"steps": 1000},
)
sae = result.sae

held_out = [world.sample(1024, torch.Generator().manual_seed(i)) for i in range(4)]
print(reconstruction_metrics(sae, held_out))
print("recovered:", ground_truth_recovery(sae, world.directions).recovered_fraction)

# Any iterable of [B, d_in] tensors works as data, e.g. activations you saved yourself:
my_activations = [b.x for b in held_out]
saelab.train({"architecture": "relu", "d_in": 64, "d_sae": 256}, my_activations * 25, {"steps": 100})

saelab.save(sae, "runs/quickstart_sae")  # SAELens v6 layout: sae_lens.SAE.load_from_disk reads it
print(saelab.load("runs/quickstart_sae"))
