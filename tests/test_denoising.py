import torch
from torch import nn

from sodlib.box_ops import box_cxcywh_to_xyxy
from sodlib.models.denoising import get_contrastive_denoising_training_group


def _targets(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centres = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=g) * 0.1 + 0.05
        out.append(
            {"boxes": torch.cat([centres, sizes], 1), "labels": torch.randint(0, 5, (n,), generator=g)}
        )
    return out


def test_groups_shapes_mask_and_positive_indices():
    torch.manual_seed(0)
    embed = nn.Embedding(6, 8, padding_idx=5)
    targets = _targets([3, 0, 7])
    emb, boxes, mask, meta = get_contrastive_denoising_training_group(targets, 5, 10, embed, num_denoising=30)
    groups = 30 // 7
    num_dn = 2 * 7 * groups
    assert meta["dn_num_group"] == groups and meta["dn_num_split"] == [num_dn, 10]
    assert emb.shape == (3, num_dn, 8) and boxes.shape == (3, num_dn, 4)
    assert mask.shape == (num_dn + 10, num_dn + 10) and mask.dtype == torch.bool
    assert mask[num_dn:, :num_dn].all() and not mask[num_dn:, num_dn:].any()  # matching queries see no dn
    assert not mask[:14, :14].any() and mask[:14, 14:num_dn].all() and not mask[:num_dn, num_dn:].any()
    pos = meta["dn_positive_idx"]
    assert [len(p) for p in pos] == [3 * groups, 0, 7 * groups]
    assert pos[0].tolist() == [g * 14 + j for g in range(groups) for j in range(3)]
    assert pos[0].dtype == torch.long
    # padded queries (image 1 has no objects) carry the padding label's zero embedding
    assert (emb[1] == 0).all()


def test_noise_magnitudes_positive_vs_negative():
    torch.manual_seed(1)
    embed = nn.Embedding(6, 8, padding_idx=5)
    targets = _targets([4])
    emb, boxes, _, meta = get_contrastive_denoising_training_group(
        targets, 5, 10, embed, num_denoising=40, label_noise_ratio=0.0, box_noise_scale=0.5
    )
    groups = meta["dn_num_group"]
    gt = box_cxcywh_to_xyxy(targets[0]["boxes"]).repeat(2 * groups, 1)
    noisy = box_cxcywh_to_xyxy(boxes[0].sigmoid())
    half = (targets[0]["boxes"][:, 2:] * 0.5 * 0.5).repeat(2 * groups, 2)  # scale * wh / 2
    shift = (noisy - gt).abs()
    negative = (torch.arange(8 * groups) // 4 % 2 == 1).unsqueeze(-1)
    assert (shift[~negative.expand_as(shift)] <= half[~negative.expand_as(shift)] + 1e-4).all()
    assert (shift[negative.expand_as(shift)] >= half[negative.expand_as(shift)] - 1e-4).all()
    # label_noise_ratio = 0 keeps every label
    labels = targets[0]["labels"].repeat(2 * groups)
    torch.testing.assert_close(emb[0], embed(labels))


def test_no_objects_or_no_budget_returns_none():
    embed = nn.Embedding(6, 8, padding_idx=5)
    assert get_contrastive_denoising_training_group(_targets([0, 0]), 5, 10, embed) == (None,) * 4
    assert (
        get_contrastive_denoising_training_group(_targets([2]), 5, 10, embed, num_denoising=0) == (None,) * 4
    )


def test_more_objects_than_budget_gives_one_group():
    embed = nn.Embedding(6, 8, padding_idx=5)
    _, boxes, _, meta = get_contrastive_denoising_training_group(
        _targets([12]), 5, 10, embed, num_denoising=5
    )
    assert meta["dn_num_group"] == 1 and boxes.shape[1] == 24
    # box_noise_scale = 0 still returns logit-space boxes
    _, boxes0, _, _ = get_contrastive_denoising_training_group(
        _targets([2]), 5, 10, embed, box_noise_scale=0.0
    )
    torch.testing.assert_close(boxes0[0, :2].sigmoid(), _targets([2])[0]["boxes"], atol=1e-5, rtol=1e-5)
