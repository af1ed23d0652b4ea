"""open_clip CoCa reference outputs for tests/test_convert_coca.py, run in a subprocess (open_clip's
`generate` needs transformers < 5, which the test puts first on the path).

    python tests/coca_reference.py CONFIG.json OUT_DIR

Builds open_clip's CoCa from the model config with every parameter set explicitly from a seed, and
writes OUT_DIR/model.safetensors (the state dict), OUT_DIR/inputs.npz (images NCHW, text ids) and
OUT_DIR/outputs.npz (image / text features, caption logits, greedy and beam-search captions).
"""
import json
import os
import sys

import numpy as np
import torch


def init_all(model, eos_id, pad_id, seed=0):
    """Every parameter drawn explicitly (open_clip leaves some, e.g. text_decoder.text_projection,
    uninitialised): matrices N(0, fan_in^-1/2), LayerNorm scales 1 + N(0, 0.1), biases N(0, 0.05),
    queries / embeddings N(0, 0.5). The vocabulary head's padding column is zero (so no caption
    contains the padding id, which open_clip's text mask would treat as padding), its EOS column x3
    (so captions do end)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(float(np.log(1 / 0.07)))
            elif "ln" in name.split(".")[-2] and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2 and "embedding" not in name and "query" not in name:
                fan_in = p.shape[0] if name.endswith(("proj", "projection")) else int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        head = model.text_decoder.text_projection
        head[:, pad_id] = 0.0
        head[:, eos_id] *= 3.0


def main(cfg_path, out_dir):
    from open_clip.coca_model import CoCa
    from safetensors.torch import save_file

    spec = json.load(open(cfg_path))
    cfg, gen = spec["model"], spec["generate"]
    torch.manual_seed(0)
    model = CoCa(**cfg).eval()
    init_all(model, gen["eos_id"], gen["pad_id"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "model.safetensors"))

    rng = np.random.RandomState(1)
    size, ctx, vocab = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"], cfg["text_cfg"]["vocab_size"]
    b = spec["batch"]
    images = rng.randn(b, 3, size, size).astype(np.float32)
    text = np.zeros((b, ctx), np.int64)
    for i in range(b):  # SOT, tokens, EOT, padding (lengths vary; the last row fills the context)
        n = ctx if i == b - 1 else rng.randint(3, ctx)
        text[i, :n] = np.concatenate([[gen["sot_id"]], rng.randint(1, vocab - 2, n - 2), [gen["eos_id"]]])
    np.savez(os.path.join(out_dir, "inputs.npz"), images=images, text=text)

    with torch.no_grad():
        x, t = torch.from_numpy(images), torch.from_numpy(text)
        out = model(x, t)
        ids = dict(sot_token_id=gen["sot_id"], eos_token_id=gen["eos_id"], pad_token_id=gen["pad_id"],
                   seq_len=gen["seq_len"], min_seq_len=gen["min_seq_len"],
                   repetition_penalty=gen["repetition_penalty"])
        greedy = model.generate(x, generation_type="top_k", top_k=1, **ids)
        beam = model.generate(x, generation_type="beam_search", num_beams=gen["num_beams"], num_beam_groups=1, **ids)
    np.savez(os.path.join(out_dir, "outputs.npz"), image_features=out["image_features"].numpy(),
             text_features=out["text_features"].numpy(), logits=out["logits"].numpy(), greedy=greedy.numpy(),
             beam=beam.numpy())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
