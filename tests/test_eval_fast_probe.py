"""The fast probe: the head grid learns separable features, kNN equals brute force, the cache resumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from extrema.checkpoint import read_checkpoint
from extrema.config import FastProbeConfig
from extrema.distributed import DistInfo
from extrema.engine.fast_probe import FastProbeTrainer, holdout_split
from extrema.engine.feature_cache import FeatureCache
from extrema.engine.head_grid import GridSGD, grid_loss
from extrema.engine.knn import knn_scores, knn_topk, merge_topk
from extrema.models.head_grid import HeadGrid, grid_specs
from tests.eval_runs import NUM_CLASSES, fast_probe_config, write_dataset, write_pretrain_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fast_probe_data")
    return write_dataset(root / "images"), root / "filelists"


def separable_features(n: int, dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return 20.0 + 5.0 * (means[labels] + torch.randn(n, dim, generator=g)), labels


def test_default_grid_has_at_least_16_heads_with_and_without_bn():
    cfg = FastProbeConfig()
    specs = grid_specs(cfg.lrs, cfg.batchnorm)
    assert len(specs) == len(cfg.lrs) * len(cfg.batchnorm) >= 16
    assert cfg.protocol_lr in cfg.lrs  # the default grid holds the linear probe's head already
    assert {s.batchnorm for s in specs} == {True, False}
    assert len({(s.base_lr, s.batchnorm) for s in specs}) == len(specs)


def test_grid_heads_learn_separable_features_and_choice_uses_holdout(data, tmp_path):
    trainer = FastProbeTrainer(fast_probe_config(*data, epochs=40, warmup_epochs=2), tmp_path / "run")
    n_train = len(trainer.splits.train)
    train_x, train_y = separable_features(n_train, trainer.dim, NUM_CLASSES, seed=1)
    val_x, val_y = separable_features(1000, trainer.dim, NUM_CLASSES, seed=2)
    assert trainer.train_heads(train_x, train_y, stop_requested=lambda: False)
    assert trainer.step == trainer.total_steps == 40 * trainer.steps_per_epoch

    # Poison the val labels: the choice must not move, since only the held-out train rows may decide it.
    shuffled = val_y[torch.randperm(len(val_y), generator=torch.Generator().manual_seed(3))]
    honest = trainer.evaluate_grid(train_x, train_y, val_x, val_y)
    poisoned = trainer.evaluate_grid(train_x, train_y, val_x, shuffled)
    assert honest["chosen"]["name"] == poisoned["chosen"]["name"]
    assert honest["chosen"]["val_top1"] >= 99.0, honest["chosen"]
    assert len(honest["grid"]) == 16 and honest["holdout_size"] + honest["fit_size"] == n_train


def test_one_grid_step_equals_independent_sgd_per_head():
    # The batched grid + per-head lr must do exactly what torch's SGD does to each head alone.
    specs = grid_specs([0.1, 1.0], [True, False])
    grid = HeadGrid(6, 3, specs, torch.Generator().manual_seed(0))
    singles = []
    for i, spec in enumerate(specs):
        linear = torch.nn.Linear(6, 3)
        linear.weight.data.copy_(grid.weight.data[i])
        linear.bias.data.copy_(grid.bias.data[i])
        bn = torch.nn.BatchNorm1d(6, affine=False, eps=1e-5)  # the reference head's eps
        head = torch.nn.Sequential(bn, linear) if spec.batchnorm else torch.nn.Sequential(linear)
        singles.append((head, torch.optim.SGD(head.parameters(), lr=spec.base_lr, momentum=0.9)))
    opt = GridSGD(grid, momentum=0.9, head_lrs=torch.tensor([s.base_lr for s in specs]))
    for step in range(3):
        x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(step)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        opt.zero_grad()
        grid_loss(grid(x), y).backward()
        opt.step()
        for head, sgd in singles:
            sgd.zero_grad()
            torch.nn.functional.cross_entropy(head(x), y).backward()
            sgd.step()
    for i, (head, _) in enumerate(singles):
        torch.testing.assert_close(grid.weight[i], head[-1].weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grid.bias[i], head[-1].bias, rtol=1e-6, atol=1e-7)


def brute_force_knn(train, labels, queries, num_classes, k, temperature):
    """One query at a time in plain Python: cosine similarities, sort, weighted vote."""
    scores = []
    for q in queries.tolist():
        sims = []
        for row, label in zip(train.tolist(), labels.tolist(), strict=True):
            dot = sum(a * b for a, b in zip(q, row, strict=True))
            norm = math.sqrt(sum(a * a for a in q)) * math.sqrt(sum(b * b for b in row))
            sims.append((dot / norm, label))
        sims.sort(key=lambda t: -t[0])
        votes = [0.0] * num_classes
        for sim, label in sims[:k]:
            votes[label] += math.exp(sim / temperature)
        scores.append(votes)
    return torch.tensor(scores)


@pytest.mark.parametrize("chunk", [1024, 3])
def test_knn_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(40, 5, generator=g), torch.randint(0, 4, (40,), generator=g)
    queries = torch.randn(9, 5, generator=g)
    got = knn_scores(train, labels, queries, num_classes=4, k=7, temperature=0.07, chunk=chunk)
    want = brute_force_knn(train, labels, queries, 4, 7, 0.07)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_merged_shard_neighbours_are_the_whole_banks_even_from_a_shard_smaller_than_k():
    g = torch.Generator().manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(12, 4, generator=g), dim=1)
    labels, queries = (
        torch.randint(0, 3, (12,), generator=g),
        torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1),
    )
    shards = [knn_topk(bank[a:b], labels[a:b], queries, k=5, chunk=4) for a, b in ((0, 3), (3, 12))]
    assert torch.isinf(shards[0][0][:, 3:]).all()  # 3 rows for k=5: two missing neighbours, weight 0
    sims, labs = merge_topk(torch.cat([s for s, _ in shards], 1), torch.cat([lab for _, lab in shards], 1), k=5)
    # Against a full sort of every query's similarities.
    want_sims, order = (queries @ bank.T).sort(dim=1, descending=True)
    torch.testing.assert_close(sims, want_sims[:, :5])
    assert torch.equal(labs, labels[order[:, :5]])


def test_knn_refuses_k_larger_than_the_bank():
    with pytest.raises(ValueError, match="knn k=5 exceeds the 3"):
        knn_scores(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), torch.randn(1, 2), 2, k=5)


def test_holdout_split_is_disjoint_and_complete():
    fit, hold = holdout_split(100, 0.1, seed=0)
    assert len(hold) == 10 and len(fit) == 90
    assert sorted(fit.tolist() + hold.tolist()) == list(range(100))


def test_each_rank_reads_back_only_its_own_block_of_the_cache(tmp_path):
    # Two ranks' blocks written by one process (no collectives without a process group): rank 1 holds
    # rows [4, 7) of 7, and reading all blocks gives the split in order.
    x = torch.arange(7 * 3, dtype=torch.float32).view(7, 3)
    y = torch.arange(7) % 2
    fingerprint = {"num_rows": 7, "dim": 3, "dtype": "float16"}
    caches = [FeatureCache(tmp_path, "train", fingerprint, DistInfo(rank, 2)) for rank in (0, 1)]
    for cache in caches:
        dataset = torch.utils.data.TensorDataset(x, y)
        assert cache.extract(dataset, lambda b: b, torch.device("cpu"), 2, 0, lambda: False, flush_every=1)
    own_x, own_y = caches[1].load_own()
    assert own_x.dtype == torch.float16 and torch.equal(own_x.float(), x[4:]) and torch.equal(own_y, y[4:])
    assert torch.equal(caches[0].load_own()[0].float(), x[:4])
    all_x, all_y = caches[1].load()
    assert torch.equal(all_x.float(), x) and torch.equal(all_y, y)


def test_extraction_and_head_training_resume_exactly_and_the_run_reports(data, tmp_path):
    data_root, cache = data
    checkpoint = tmp_path / "pretrain.pt"
    write_pretrain_checkpoint(checkpoint)
    straight = FastProbeTrainer(fast_probe_config(data_root, cache, str(checkpoint)), tmp_path / "straight")
    assert straight.fit().status == "finished"

    # Stop after three extraction batches of the train split (64 images in batches of 10).
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    first = FastProbeTrainer(fast_probe_config(data_root, cache, str(checkpoint)), tmp_path / "resumed")
    assert first.fit(stop_requested=stop_after_three).status == "stopped"
    progress = json.loads((tmp_path / "resumed/features/train.000-of-001.progress.json").read_text())
    assert progress == {"rows_done": 30}
    second = FastProbeTrainer(fast_probe_config(data_root, cache, str(checkpoint)), tmp_path / "resumed")
    assert not second.resume()  # nothing but the partial feature cache so far
    assert second.fit(stop_requested=lambda: second.step >= 5).status == "stopped"  # now mid head training
    third = FastProbeTrainer(fast_probe_config(data_root, cache, str(checkpoint)), tmp_path / "resumed")
    assert third.resume() and third.step == 5
    assert third.fit().status == "finished"

    final = f"checkpoints/ckpt_{straight.total_steps:09d}.pt"
    a, b = (read_checkpoint(tmp_path / r / final) for r in ("straight", "resumed"))
    for key in a["grid"]:
        assert torch.equal(a["grid"][key], b["grid"][key]), key
    for x, y in zip(a["optimizer"]["buffers"], b["optimizer"]["buffers"], strict=True):
        assert torch.equal(x, y)

    for split in ("train", "val"):
        for kind in ("features", "labels"):
            name = f"features/{split}.000-of-001.{kind}.npy"
            assert np.array_equal(np.load(tmp_path / "straight" / name), np.load(tmp_path / "resumed" / name))
    records = [json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("straight", "resumed")]
    assert records[0]["results"]["grid"] == records[1]["results"]["grid"]
    assert records[0]["results"]["knn"] == records[1]["results"]["knn"]
    record = records[0]
    assert record["protocol"] == "fastprobe" and len(record["results"]["grid"]) == 16
    assert record["results"]["knn"]["k"] == 5 and 0 <= record["results"]["knn"]["top1"] <= 100
    # The headline estimates the linear probe: the BN head at the protocol lr, whatever the grid's best is.
    assert record["results"]["estimates"] == "linprobe"
    assert record["results"]["protocol_head"]["name"] == "lr0.1_bn"
    assert record["results"]["top1"] == record["results"]["protocol_head"]["val_top1"]
    assert record["weights"]["path"] == str(checkpoint) and record["weights"]["step"] == 123


def test_the_linear_probe_head_joins_a_grid_that_lacks_it(data, tmp_path):
    trainer = FastProbeTrainer(fast_probe_config(*data, lrs=[0.01, 1.0], batchnorm=[False]), tmp_path / "run")
    assert [s.name for s in trainer.specs] == ["lr0.1_bn", "lr0.01_nobn", "lr1_nobn"]
    assert trainer.protocol_index == 0


def test_train_features_come_from_one_seeded_protocol_view_per_image(data, tmp_path):
    # The train cache holds one RandomResizedCrop + flip view per image, drawn from (seed, image): the same
    # again in a second run, other than the centre crop, and other again under another seed.
    checkpoint = tmp_path / "pretrain.pt"
    write_pretrain_checkpoint(checkpoint)  # the same backbone whatever the run's seed

    def train_features(name: str, **kw) -> torch.Tensor:
        trainer = FastProbeTrainer(fast_probe_config(*data, str(checkpoint), **kw), tmp_path / name)
        assert trainer.extract_features(stop_requested=lambda: False)
        return trainer.caches["train"].load()[0].float()

    first, again = train_features("a"), train_features("b")
    assert torch.equal(first, again)
    center = train_features("center", train_view="center")
    other_seed = train_features("seed1", run={"seed": 1})
    for different in (center, other_seed):
        assert (first - different).abs().amax(dim=1).min() > 0  # every image's view differs


def test_knn_bank_holds_the_centre_crops_while_the_heads_train_on_protocol_views(data, tmp_path):
    checkpoint = tmp_path / "pretrain.pt"
    write_pretrain_checkpoint(checkpoint)
    protocol = FastProbeTrainer(fast_probe_config(*data, str(checkpoint)), tmp_path / "protocol")
    assert protocol.knn_bank == "train_center"
    assert protocol.extract_features(stop_requested=lambda: False)
    center = FastProbeTrainer(fast_probe_config(*data, str(checkpoint), train_view="center"), tmp_path / "center")
    assert center.knn_bank == "train" and set(center.caches) == {"train", "val"}
    assert center.extract_features(stop_requested=lambda: False)
    bank, bank_labels = protocol.caches["train_center"].load()
    centre_crops, labels = center.caches["train"].load()
    assert torch.equal(bank, centre_crops) and torch.equal(bank_labels, labels)
    assert not torch.equal(protocol.caches["train"].load()[0], bank)
    no_knn = FastProbeTrainer(fast_probe_config(*data, str(checkpoint), knn=False), tmp_path / "no_knn")
    assert set(no_knn.caches) == {"train", "val"}  # no bank to extract when kNN is off
