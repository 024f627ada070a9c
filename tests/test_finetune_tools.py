"""data.py's fine-tuning tools (section 6 and 8): transformers' AdamW against its update written out in
float64, the RandAugment port's ops at the official magnitude and its seeded draws, the polynomial schedule
and tensor lrs, and model selection (the best validation kept, then loaded)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import data


# ------------------------------------------------------------------------------------------------ AdamW
def hf_adamw_reference(p, grads, lr, betas, eps, wd):
    """transformers.optimization.AdamW (correct_bias=True), step by step in float64."""
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        g = g.double()
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        p = p - step_size * m / (v.sqrt() + eps)
        p = p - lr * wd * p  # after the update, on the updated weights
    return p


@pytest.mark.parametrize("lr_on_device", [False, True])
def test_adamw_is_transformers_update_and_not_torchs(lr_on_device):
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(50, generator=gen)
    grads = [torch.randn(50, generator=gen) * 1e-3 for _ in range(6)]  # small gradients: eps matters
    lr, betas, eps, wd = 1e-2, (0.9, 0.98), 1e-4, 0.1
    ours = torch.nn.Parameter(start.clone())
    opt = data.AdamWHF([dict(params=[ours], base_lr=lr)], lr, betas, eps, weight_decay=wd)
    data.set_lr(opt, 1.0, tensors=lr_on_device)
    assert torch.is_tensor(opt.param_groups[0]["lr"]) == lr_on_device
    theirs = torch.nn.Parameter(start.clone())
    torch_opt = torch.optim.AdamW([theirs], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for g in grads:
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step(), torch_opt.step()
    expected = hf_adamw_reference(start, grads, lr, betas, eps, wd)
    torch.testing.assert_close(ours.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert (theirs.detach().double() - expected).abs().max() > 1e-4  # torch's AdamW is another update


def test_adamw_restored_from_a_checkpoint_continues_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(20, generator=gen) for _ in range(6)]
    start = torch.randn(20, generator=gen)

    def run(steps, state=None, value=start):
        p = torch.nn.Parameter(value.clone())
        opt = data.AdamWHF([dict(params=[p], base_lr=1e-2)], 1e-2, (0.9, 0.98), 1e-8, weight_decay=0.01)
        data.set_lr(opt, 1.0)
        if state is not None:
            opt.load_state_dict(state)
        for g in steps:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt.state_dict()

    whole, _ = run(grads)
    half, state = run(grads[:3])
    state = torch.load(__import__("io").BytesIO(_saved(state)), weights_only=True)  # as a checkpoint holds it
    resumed, after = run(grads[3:], state, half)
    assert torch.equal(resumed, whole) and after["state"][0]["step"].item() == 6


def _saved(obj):
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_schedule_and_tensor_lrs():
    assert [data.warmup_linear(s, 10, 0.2) for s in (0, 1, 2, 6, 10)] == [0, 0.5, 1.0, 0.5, 0.0]
    p = torch.nn.Parameter(torch.zeros(2))
    opt = data.AdamWHF([dict(params=[p], base_lr=0.5)], 0.5)
    data.set_lr(opt, 1.0, tensors=True)
    lr = opt.param_groups[0]["lr"]
    data.set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.125  # filled in place: a CUDA graph reads it


# ------------------------------------------------------------------------------------------------ RandAugment
def photo(seed=0, size=(48, 40)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def op(name):
    (_, fn, lo, hi), = [o for o in data.RANDAUGMENT_OPS if o[0] == name]
    return lambda img: fn(img, 9 / 30 * (hi - lo) + lo)  # the official magnitude m = 9


def test_randaugment_ops_at_magnitude_9_behave_as_the_official_port():
    assert [o[0] for o in data.RANDAUGMENT_OPS][:6] == ["AutoContrast", "Equalize", "Rotate", "Posterize", "Solarize",
                                                        "SolarizeAdd"] and len(data.RANDAUGMENT_OPS) == 14
    img = photo()
    pixels = np.asarray(img).astype(int)
    assert set(np.unique(np.asarray(op("Posterize")(img)))) <= {0, 128}  # int(1.2) = 1 bit
    solarized = np.asarray(op("Solarize")(img)).astype(int)
    assert (solarized == np.where(pixels >= 76.8, 255 - pixels, pixels)).all()
    added = np.clip(pixels + 33, 0, 255)
    assert (np.asarray(op("SolarizeAdd")(img)).astype(int) == np.where(added >= 128, 255 - added, added)).all()
    darker = np.asarray(op("Brightness")(img)).astype(float)
    assert abs(darker.mean() / pixels.mean() - 0.64) < 0.02  # one factor, 0.3 * 1.8 + 0.1, no random sign
    with torch.random.fork_rng():
        shifted = {tuple(np.asarray(op("TranslateXabs")(Image.new("L", (100, 1), 0).convert("RGB")
                                                        .point(lambda v: 255))).sum(axis=(0, 2)).nonzero()[0][[0, -1]])
                   for _ in range(20)}
    assert shifted <= {(30, 99), (0, 69)} and len(shifted) == 2  # 30 px, either way


def test_seeded_items_make_the_port_reproducible_per_image_and_epoch(tmp_path):
    items = []
    for i in range(3):
        photo(i).save(tmp_path / f"{i}.png")
        items.append(data.Item(str(tmp_path / f"{i}.png"), i, f"c{i}"))
    to_array = lambda img: torch.from_numpy(np.asarray(img).copy())  # noqa: E731
    transform = lambda img: to_array(data.RandAugmentPort(2, 9)(img))  # noqa: E731
    ds = data.SeededItems(items, data.open_rgb, transform, seed=1, augment=True)
    first = [ds[i][0] for i in range(3)]
    torch.manual_seed(123)  # the global RNG's state does not matter
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))
    ds.epoch = 1
    assert any(not torch.equal(a, ds[i][0]) for i, a in enumerate(first))


# ------------------------------------------------------------------------------------------------ selection
def test_the_best_validation_is_kept_and_loaded(tmp_path):
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    best = None
    for at, (acc, value) in enumerate([(50.0, 1.0), (70.0, 2.0), (70.0, 3.0), (60.0, 4.0)]):
        with torch.no_grad():
            model.weight.fill_(value)
        best = data.keep_best(tmp_path, model, acc, at / 2, best)
    assert best == {"acc": 70.0, "at": 0.5}  # the first of equal accuracies stays
    assert set(data.load_checkpoint(tmp_path / "best.pt")) == {"weight"}
    assert data.select_model(model, tmp_path, best) == {"by": "validation", "epoch": 0.5, "val_acc": 70.0}
    assert (model.weight == 2.0).all()
    assert data.select_model(model, tmp_path, None) == {"by": "last epoch"}
