"""Reference PyTorch CLIPs with random, non-trivial weights for the converter tests (no downloads):
open_clip models built from a model-config dict, their embeddings, and matching random inputs."""
import numpy as np
import torch


def rerandomise(model, seed=0):
    """Moves every 1-D parameter (LayerNorm/BatchNorm weights and biases, all biases, embeddings)
    and the BatchNorm statistics off their trivial init; sets a non-default logit scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim <= 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
        model.logit_scale.fill_(2.3)
    return model.eval()


def random_inputs(batch, image_size, length, vocab, eot_positions, seed=0):
    """NHWC float images and token ids whose end-of-text (the largest id) sits at `eot_positions`."""
    rng = np.random.RandomState(seed)
    images = rng.randn(batch, image_size, image_size, 3).astype(np.float32)
    ids = rng.randint(1, vocab - 1, size=(len(eot_positions), length)).astype(np.int64)
    for row, e in enumerate(eot_positions):  # end-of-text = the largest id, zero padding after it
        ids[row, e] = vocab - 1
        ids[row, e + 1:] = 0
    return images, ids


def open_clip_model(cfg, seed=0):
    """An open_clip `CLIP(**cfg)` (cfg: open_clip's model-config dict) with re-randomised weights, in eval mode."""
    from open_clip.model import CLIP  # noqa: PLC0415

    torch.manual_seed(seed)
    model = CLIP(**cfg)
    model = rerandomise(model, seed)
    if model.logit_bias is not None:
        with torch.no_grad():
            model.logit_bias.fill_(-3.5)
    return model


def open_clip_reference(model, images, ids):
    """open_clip's (unit image embeddings, unit text embeddings, image-text logits) for NHWC `images`."""
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)), normalize=True)
        txt = model.encode_text(torch.from_numpy(ids), normalize=True)
        logits, _ = model.get_logits(torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(ids))
    return img.numpy(), txt.numpy(), logits.numpy()
