import pytest
import torch

from kelix.training.optim import OptimConfig, build_optimizer, param_groups


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(3, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.head = torch.nn.Linear(3, 2)
        self.frozen = torch.nn.Linear(3, 3).requires_grad_(False)


def test_groups_split_lr_and_decay_and_skip_frozen():
    groups = {g["name"]: g for g in param_groups(Net(), OptimConfig(lr=1e-3, group_lr={"encoder.": 1e-5}))}
    assert set(groups) == {"encoder", "encoder_no_decay", "default", "default_no_decay"}
    assert groups["encoder"]["names"] == ["encoder.weight"] and groups["encoder"]["lr"] == 1e-5
    assert groups["default"]["names"] == ["head.weight"] and groups["default"]["weight_decay"] == 0.01
    assert groups["default_no_decay"]["names"] == ["norm.weight", "norm.bias", "head.bias"]
    assert groups["default_no_decay"]["weight_decay"] == 0.0


def test_the_first_matching_group_lr_prefix_wins():
    cfg = OptimConfig(lr=1e-3, group_lr={"encoder.": 1e-5, "enc": 1e-4, "head": 2e-4})
    groups = {g["name"]: g for g in param_groups(Net(), cfg)}
    assert groups["encoder"]["lr"] == 1e-5 and groups["encoder"]["names"] == ["encoder.weight"]
    assert groups["head"]["lr"] == 2e-4 and "enc" not in groups


def test_no_trainable_parameters_is_an_error():
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(torch.nn.Linear(2, 2).requires_grad_(False), OptimConfig())


def lrs(schedule, steps=10, **kw):
    opt = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(lr=1.0, schedule=schedule, **kw), steps)
    o, s = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(steps):
        out.append(o.param_groups[0]["lr"])
        o.step()
        s.step()
    return out


def test_schedules_exact_values():
    assert lrs("constant", warmup_steps=2) == pytest.approx([0.0, 0.5] + [1.0] * 8)
    cos = lrs("cosine", warmup_steps=0, min_lr_ratio=0.1)
    assert cos[0] == pytest.approx(1.0) and cos[5] == pytest.approx(0.55) and min(cos) >= 0.1
    lin = lrs("linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lin == pytest.approx([1.0 - i / 10 for i in range(10)])
    wsd = lrs("wsd", warmup_steps=2, decay_steps=4, min_lr_ratio=0.0)
    assert wsd[:6] == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0]) and wsd[-1] < 0.2
    with pytest.raises(ValueError, match="decay_steps must be in"):
        lrs("wsd", decay_steps=0)
