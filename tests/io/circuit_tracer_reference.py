"""circuit-tracer's own forward on transcoder folders; executed by test_transcoder_formats.py inside an
environment with circuit-tracer 0.5.0 installed (it pins transformers <= 4.57 and huggingface-hub < 1,
which clash with saelab's). Usage: python circuit_tracer_reference.py INPUTS.npy OUT.npz FOLDER...

INPUTS is [L, B, d] (layer l's input at [l]). A folder with layer_*.safetensors is a transcoder set:
OUT holds `<folder name>/f` [L, B, F] and `<folder name>/y` [L, B, d] from TranscoderSet.encode and
its layers' forward (skip included). A folder with W_enc_*.safetensors is a CLT: the same keys from
CrossLayerTranscoder.encode and .forward.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set


def main() -> None:
    x = torch.from_numpy(np.load(sys.argv[1])).float()
    out = {}
    cpu = torch.device("cpu")
    for folder in map(Path, sys.argv[3:]):
        with torch.no_grad():
            if (folder / "W_enc_0.safetensors").exists():
                clt = load_clt(str(folder), device=cpu, dtype=torch.float32, lazy_decoder=False)
                f, y = clt.encode(x), clt.forward(x)
            else:
                paths = {int(p.stem.split("_")[1]): str(p) for p in folder.glob("layer_*.safetensors")}
                tset = load_transcoder_set(
                    paths, "test", "hook_resid_mid", "hook_mlp_out", device=cpu, lazy_encoder=False, lazy_decoder=False
                )
                f = tset.encode(x)
                y = torch.stack([tc(x[i]) for i, tc in enumerate(tset)])
        out[f"{folder.name}/f"] = f.numpy()
        out[f"{folder.name}/y"] = y.numpy()
    np.savez(sys.argv[2], **out)


if __name__ == "__main__":
    main()
