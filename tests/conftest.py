import pytest
import torch

import saelab

# Toy-sized tensors gain little from intra-op threads, and several multi-threaded torch
# processes on a 2-core machine (pytest plus demo workers, or a second job) slow each other
# down by an order of magnitude or more.
torch.set_num_threads(1)


def small_config(arch: str, d_in: int = 12, d_sae: int = 32, **extra) -> dict:
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, **extra}
    if saelab.sae.get_class(arch).sweep_parameter == "k":
        cfg.setdefault("k", 4)
    return cfg


# Architectures trained by gradient (the loop); fitted baselines (PCA, ...) are fitted beside it.
# The contracts below run on one activation stream; cross-layer transcoders (which need named sites
# of several layers) have their own tests in tests/sae/test_clt.py.
TRAINED = [a for a in saelab.list_architectures(one_stream=True) if not saelab.sae.get_class(a).fitted]


@pytest.fixture(params=saelab.list_architectures(one_stream=True))
def arch(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
