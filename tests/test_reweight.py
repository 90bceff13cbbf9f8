import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sodlib.losses.reweight import FewSampleBatchNorm1d, SampleWeightGenerator

C = 8


def _features(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, C, generator=g), torch.randn(m, C, generator=g)


def _randomise(gen, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _bn(x, norm, training):
    return F.batch_norm(
        x,
        norm.running_mean.clone(),
        norm.running_var.clone(),
        norm.weight,
        norm.bias,
        training=training,
        eps=norm.eps,
    )


def _reference(gen, h_cls, h_reg, training):
    """Fig. 4 written out: Eqs. 16-18 with 1×1 convs as matrix products."""
    a = torch.sigmoid(
        F.relu(_bn(torch.cat([h_reg, h_cls], -1) @ gen.conv1.weight.T + gen.conv1.bias, gen.norm1, training))
    )  # Eq. 16
    out = []
    for branch, h in ((gen.cls, h_cls), (gen.reg, h_reg)):  # Eqs. 17, 18
        z = (h * (a @ branch.conv2.weight.T + branch.conv2.bias)) @ branch.conv3.weight.T + branch.conv3.bias
        out.append(torch.sigmoid(_bn(z, branch.norm, training)).squeeze(-1))
    return out


def test_generator_matches_fig4_in_train_and_eval():
    gen = SampleWeightGenerator(C)
    _randomise(gen)
    h_cls, h_reg = _features(5)
    assert (gen.conv1.in_features, gen.conv1.out_features) == (2 * C, C)  # Conv1: C×2C×1×1
    assert (gen.cls.conv2.in_features, gen.cls.conv3.out_features) == (C, 1)  # Conv2 C×C, Conv3 1×C
    for training in (True, False):
        gen.train(training)
        expected = _reference(gen, h_cls, h_reg, training)
        w_cls, w_reg = gen(h_cls, h_reg)
        assert w_cls.shape == w_reg.shape == (5,)
        assert_close(w_cls, expected[0])
        assert_close(w_reg, expected[1])
        assert ((w_cls > 0) & (w_cls < 1)).all()
    logits = gen.logits(h_cls, h_reg)
    assert_close(logits[0].sigmoid(), gen(h_cls, h_reg)[0])


def test_generator_handles_zero_and_one_matched_query():
    gen = SampleWeightGenerator(C).train()
    _randomise(gen)
    running = gen.norm1.running_mean.clone()
    h_cls, h_reg = _features(1)
    w_cls, w_reg = gen(h_cls, h_reg)  # BatchNorm cannot use batch statistics of one sample
    assert_close(w_cls, _reference(gen, h_cls, h_reg, training=False)[0])  # -> running statistics
    assert_close(gen.norm1.running_mean, running)  # ... left unchanged
    (w_cls + w_reg).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gen.parameters() if p.grad is not None)
    w_cls, w_reg = gen(torch.zeros(0, C), torch.zeros(0, C))
    assert w_cls.shape == w_reg.shape == (0,)
    bn = FewSampleBatchNorm1d(C).train()
    x = torch.randn(4, C)
    assert_close(bn(x), F.batch_norm(x, None, None, bn.weight, bn.bias, training=True))


@pytest.mark.parametrize(
    "shape_cls, shape_reg", [((3, C), (2, C)), ((3, C + 1), (3, C + 1)), ((1, 3, C), (1, 3, C))]
)
def test_generator_rejects_bad_shapes(shape_cls, shape_reg):
    with pytest.raises(ValueError, match=r"got \(" + ", ".join(map(str, shape_cls))):
        SampleWeightGenerator(C)(torch.zeros(shape_cls), torch.zeros(shape_reg))
