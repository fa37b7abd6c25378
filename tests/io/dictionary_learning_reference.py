"""dictionary_learning's own forward on ae.pt files; executed by test_formats.py inside an
environment with dictionary-learning 0.1.0 installed (it pulls nnsight 0.3 and numba, which stay
out of saelab's). Usage: python dictionary_learning_reference.py INPUTS.npy OUT.npz FOLDER...
Each folder's config.json names the class; OUT holds `<folder name>/f` and `<folder name>/x_hat`.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from dictionary_learning.dictionary import AutoEncoder, AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
from dictionary_learning.trainers.top_k import AutoEncoderTopK


def build(dict_class: str, state: dict, d_in: int, d_sae: int):
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        cls = AutoEncoderTopK if dict_class == "AutoEncoderTopK" else BatchTopKSAE
        return cls(d_in, d_sae, int(state["k"]))
    if dict_class == "MatryoshkaBatchTopKSAE":
        return MatryoshkaBatchTopKSAE(d_in, d_sae, int(state["k"]), state["group_sizes"].tolist())
    cls = {"AutoEncoder": AutoEncoder, "AutoEncoderNew": AutoEncoderNew, "GatedAutoEncoder": GatedAutoEncoder}.get(
        dict_class, JumpReluAutoEncoder
    )
    return cls(d_in, d_sae)


def main(inputs: str, out: str, folders: list[str]) -> None:
    x = torch.from_numpy(np.load(inputs)).float()
    results = {}
    for folder in map(Path, folders):
        trainer = json.loads((folder / "config.json").read_text())["trainer"]
        state = torch.load(folder / "ae.pt", weights_only=True)
        ae = build(trainer["dict_class"], state, trainer["activation_dim"], trainer["dict_size"])
        ae.load_state_dict(state)
        with torch.no_grad():
            f = ae.encode(x)
            results[f"{folder.name}/f"] = f.numpy()
            results[f"{folder.name}/x_hat"] = ae.decode(f).numpy()
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
