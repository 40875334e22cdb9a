"""Random-weight SilentCipher checkpoints for tests.

The real 44.1 kHz model lives on the Hugging Face hub (sony/silentcipher), which tests cannot
reach. These files have the real model's shapes, hyper-parameters and on-disk format (or, with
`light`, fewer layers of the same widths), so the engine's loading, resampling and framing code
runs exactly as in production, but the weights are random: the "watermark" they embed is noise,
and a key embedded with them is not expected to be read back. Use them to test plumbing, never
watermark quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from csm.watermark import import_silentcipher

# The model-relevant entries of the real 44_1_khz/73999_iteration/hparams.yaml (sony/silentcipher
# on the hub). The real file also holds training-only settings (dataset, augmentations, learning
# rate, paths on Sony's cluster) that silentcipher never reads at inference.
HPARAMS_44K: dict[str, object] = {
    "SR": 44100,
    "N_FFT": 4096,
    "HOP_LENGTH": 2048,
    "model_type": "n_msg",
    "n_messages": 1,
    "message_dim": 5,
    "message_len": 21,
    "message_band_size": 1024,
    "message_sdr": 47,
    "enc_n_layers": 3,
    "dec_c_n_layers": 4,
    "ensure_negative_message": True,
    "ensure_constrained_message": False,
    "frame_level_normalization": False,
    "utterance_level_normalization": True,
    "no_normalization": False,
}

# silentcipher.server.Model hard-codes these widths rather than reading them from hparams.yaml.
_ENCODER_OUT_DIM = 32
_CARRIER_DECODER_IN_DIM = 32 * 3


# `light`: the fewest layers silentcipher builds (its first and last), read from hparams.yaml
# like the real counts. Widths, framing and the message decoder stay the real model's, so every
# code path is the same, at about a third of the CPU time per second of audio.
LIGHT_LAYERS = {"enc_n_layers": 2, "dec_c_n_layers": 2}


def write_random_silentcipher(folder: Path, seed: int = 0, light: bool = False) -> None:
    """Write the four files silentcipher.get_model loads: enc_c, dec_c, dec_m_0 and hparams.yaml.

    Seeded so a test run is reproducible; the global torch RNG is left as it was. `light`
    (tests' tiny model folders): fewer layers, see LIGHT_LAYERS.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = import_silentcipher().model
    hparams = dict(HPARAMS_44K, **(LIGHT_LAYERS if light else {}))
    hp = argparse.Namespace(**hparams)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = {
            "enc_c.ckpt": model.Encoder(
                out_dim=_ENCODER_OUT_DIM,
                n_layers=hp.enc_n_layers,
                message_dim=hp.message_dim,
                message_band_size=hp.message_band_size,
                n_fft=hp.N_FFT,
            ),
            "dec_c.ckpt": model.CarrierDecoder(
                config=hp,
                conv_dim=_CARRIER_DECODER_IN_DIM,
                n_layers=hp.dec_c_n_layers,
                message_band_size=hp.message_band_size,
            ),
            "dec_m_0.ckpt": model.MsgDecoder(
                message_dim=hp.message_dim, message_band_size=hp.message_band_size
            ),
        }
    for name, module in modules.items():
        torch.save(module.state_dict(), folder / name)
    (folder / "hparams.yaml").write_text(yaml.safe_dump(hparams))
