"""saelab's dictionary layout (`dictionary.json` + `dictionary.safetensors`): crosscoders and the
transcoders SAELens has no class for; see saelab.io.dictionary."""

from __future__ import annotations

from saelab.io import dictionary
from saelab.io.formats.base import Format, register_format

FORMAT = register_format(
    Format(
        name="saelab-dictionary",
        reads="dictionary.json + dictionary.safetensors: any saelab dictionary, including crosscoders and "
        "TopK transcoders (every site named with its width)",
        detect=dictionary.detect,
        read=lambda folder: dictionary.load(folder),
        write=lambda sae, folder: dictionary.save(sae, folder),
    )
)
