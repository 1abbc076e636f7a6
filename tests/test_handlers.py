"""EpochCheckpointSaver on a tiny ignite Engine: chosen (and counted-back) epochs, plain inference
state dicts (wrapper and deep-supervision heads dropped, strict load), rank 0 only, atomic writes."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine

import abdoseg.training.handlers as handlers
from abdoseg.networks.checkpoints import load_weights
from abdoseg.training.handlers import EpochCheckpointSaver
from abdoseg.networks import PocketUNet


def _counting_engine(net: torch.nn.Module) -> Engine:
    """Each iteration adds 1 to the first parameter: after epoch e (2 iterations each) it holds
    its initial value + 2e, which tells which epoch a checkpoint comes from."""
    first = next(net.parameters())

    def step(engine, batch):
        with torch.no_grad():
            first.add_(1.0)

    return Engine(step)


def test_saves_chosen_and_counted_back_epochs(tmp_path):
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.zero_()
    engine = _counting_engine(net)
    saver = EpochCheckpointSaver(tmp_path / "ckpt", epochs=[2, -1, 0], network=net)
    saver.attach(engine)
    saver.attach(engine)  # attaching twice registers once
    engine.run([0, 1], max_epochs=5)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model_epoch2.pt", "model_epoch4.pt",
                                                                      "model_epoch5.pt"]
    assert saver.saved == {"model_epoch2.pt": 2, "model_epoch4.pt": 4, "model_epoch5.pt": 5}
    for e in (2, 4, 5):
        sd = torch.load(tmp_path / "ckpt" / f"model_epoch{e}.pt", weights_only=True)
        assert set(sd) == {"weight", "bias"}
        assert torch.equal(sd["weight"], torch.full((1, 2), 2.0 * e))


def test_seed003_names_and_strict_inference_load(tmp_path):
    """S3/S2/S1 = the last three epochs of a DataParallel-wrapped deep-supervision PocketUNet:
    files hold no 'module.' prefix and no supervision heads, and load strictly for inference."""
    kw = dict(out_channels=3, channels=4, kernel_size=[[3, 3, 3]] * 4, strides=[[1, 1, 1]] + [[2, 2, 2]] * 3)
    net = PocketUNet(**kw, deep_supervision=True)
    wrapped = torch.nn.DataParallel(net)  # CPU: a plain wrapper with .module, like DDP
    assert any("deep_supervision_heads" in k for k in net.state_dict())
    engine = _counting_engine(net)
    EpochCheckpointSaver(tmp_path, epochs=[-2, -1, 0], network=wrapped,
                         filenames=["S3.pt", "S2.pt", "S1.pt"]).attach(engine)
    engine.run([0, 1], max_epochs=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S1.pt", "S2.pt", "S3.pt"]
    first_key = next(iter(net.state_dict()))
    for name, epoch in (("S3.pt", 2), ("S2.pt", 3), ("S1.pt", 4)):
        sd = torch.load(tmp_path / name, weights_only=True)
        assert not any(k.startswith("module.") or "deep_supervision_heads" in k for k in sd)
        infer = load_weights(PocketUNet(**kw, deep_supervision=False), tmp_path / name)  # strict
        torch.testing.assert_close(infer.state_dict()[first_key], sd[first_key])
    s1 = torch.load(tmp_path / "S1.pt", weights_only=True)[first_key]
    s3 = torch.load(tmp_path / "S3.pt", weights_only=True)[first_key]
    torch.testing.assert_close(s1 - s3, torch.full_like(s1, 4.0))  # two epochs x 2 iterations apart


def test_only_rank_0_writes(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 1)
    monkeypatch.setattr(handlers, "_rank", lambda: 1)
    engine = _counting_engine(net)
    saver = EpochCheckpointSaver(tmp_path / "ckpt", epochs=[1, 2], network=net)
    saver.attach(engine)
    engine.run([0], max_epochs=2)
    assert not (tmp_path / "ckpt").exists() and saver.saved == {}


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 1)
    engine = _counting_engine(net)
    EpochCheckpointSaver(tmp_path, epochs=[1], network=net).attach(engine)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes half a file, then the process "dies"
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 truncated")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        engine.run([0], max_epochs=1)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a temporary file
    monkeypatch.setattr(torch, "save", real_save)
    engine2 = _counting_engine(net)
    EpochCheckpointSaver(tmp_path, epochs=[1], network=net).attach(engine2)
    engine2.run([0], max_epochs=1)
    assert [p.name for p in tmp_path.iterdir()] == ["model_epoch1.pt"]


def test_unreachable_epochs_warn_and_bad_arguments(tmp_path, caplog):
    net = torch.nn.Linear(2, 1)
    engine = _counting_engine(net)
    saver = EpochCheckpointSaver(tmp_path, epochs=[7, -3, 0], network=net)
    saver.attach(engine)
    with caplog.at_level(logging.WARNING, logger="abdoseg.training.handlers"):
        engine.run([0], max_epochs=2)
    assert saver.saved == {"model_epoch2.pt": 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model_epoch7.pt (epoch 7)" in warnings[0] and "epoch -1" in warnings[0]
    # empty epochs (the bundle default checkpoint_epochs []): attached, saves nothing, no warning
    none = EpochCheckpointSaver(tmp_path / "none", epochs=[], network=net)
    other = _counting_engine(net)
    none.attach(other)
    other.run([0], max_epochs=2)
    assert none.saved == {} and not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="2 filenames for 3 epochs"):
        EpochCheckpointSaver(tmp_path, epochs=[1, 2, 3], network=net, filenames=["a.pt", "b.pt"])
    with pytest.raises(ValueError, match="repeat"):
        EpochCheckpointSaver(tmp_path, epochs=[1, 2], network=net, filenames=["a.pt", "a.pt"])
    with pytest.raises(ValueError, match="epoch"):
        EpochCheckpointSaver(tmp_path, epochs=[1], network=net, filename_template="model.pt")


def test_from_a_bundle_config_in_monai_supervised_trainer(tmp_path):
    """The ``_target_`` a preset uses, parsed by MONAI and run as a SupervisedTrainer train handler."""
    from monai.bundle import ConfigParser

    config = {
        "network": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1},
        "optimizer": {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": 0.1},
        "saver": {"_target_": "abdoseg.training.handlers.EpochCheckpointSaver", "save_dir": str(tmp_path), "network": "@network",
                  "epochs": [-1, 0], "filenames": ["S2.pt", "S1.pt"]},
        "trainer": {"_target_": "SupervisedTrainer", "device": "$torch.device('cpu')", "max_epochs": 3,
                    "train_data_loader": "$[{'image': torch.ones(1, 1, 2, 2, 2), 'label': torch.ones(1, 1, 2, 2, 2).long()}]",
                    "network": "@network", "optimizer": "@optimizer",
                    "loss_function": "$monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)",
                    "train_handlers": ["@saver"]},
    }
    parser = ConfigParser(config)
    trainer = parser.get_parsed_content("trainer")
    trainer.run()
    saver = parser.get_parsed_content("saver")
    assert saver.saved == {"S2.pt": 2, "S1.pt": 3}
    final = torch.load(tmp_path / "S1.pt", weights_only=True)
    torch.testing.assert_close(final["weight"], parser.get_parsed_content("network").weight.detach())
    assert not torch.equal(torch.load(tmp_path / "S2.pt", weights_only=True)["weight"], final["weight"])


def _train_config(tmp_path, max_epochs: int, val_interval: int) -> dict:
    """A bundle-style config: SupervisedTrainer + ValidationHandler + ModelSaver (the one writer
    of model.pt, as in the bundles' train#handlers) + TrainStatsWriter.
    The key metric is a constant, so the first validation is the best one."""
    batch = "$[{'image': torch.ones(1, 1, 2, 2, 2), 'label': torch.ones(1, 1, 2, 2, 2).long()}]"
    return {
        "network": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1},
        "optimizer": {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": 0.1},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "$torch.device('cpu')", "val_data_loader": batch,
                      "network": "@network",
                      "key_val_metric": {"m": {"_target_": "ignite.metrics.Average",
                                               "output_transform": "$lambda out: torch.tensor(1.0)"}}},
        "final": {"_target_": "abdoseg.training.handlers.ModelSaver", "save_dir": str(tmp_path), "network": "@network",
                  "evaluator": "@evaluator"},
        "stats": {"_target_": "abdoseg.training.handlers.TrainStatsWriter", "path": str(tmp_path / "train_stats.json"),
                  "evaluator": "@evaluator"},
        "trainer": {"_target_": "SupervisedTrainer", "device": "$torch.device('cpu')", "max_epochs": max_epochs,
                    "train_data_loader": batch, "network": "@network", "optimizer": "@optimizer",
                    "loss_function": "$monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)",
                    "train_handlers": [{"_target_": "ValidationHandler", "validator": "@evaluator", "epoch_level": True,
                                        "interval": val_interval}, "@final", "@stats"]},
    }


def _train_with_weight_snapshots(parser) -> list:
    """Run the config's trainer; the network's weights after every epoch."""
    from ignite.engine import Events

    snapshots = []
    trainer = parser.get_parsed_content("trainer")
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: snapshots.append(
        parser.get_parsed_content("network").weight.detach().clone()))
    trainer.run()
    return snapshots


def test_model_saver_without_validation_writes_the_last_weights(tmp_path):
    """max_epochs < val_interval: no validation saves model.pt, so ModelSaver does; stats say so."""
    import json

    from monai.bundle import ConfigParser

    parser = ConfigParser(_train_config(tmp_path, max_epochs=2, val_interval=5))
    parser.get_parsed_content("trainer").run()
    assert parser.get_parsed_content("final").saved == tmp_path / "model.pt"
    sd = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.testing.assert_close(sd["weight"], parser.get_parsed_content("network").weight.detach())
    stats = json.loads((tmp_path / "train_stats.json").read_text())
    assert stats["status"] == "DONE" and stats["epoch"] == 2 and stats["total_epochs"] == 2
    assert stats["iteration"] == 2 and len(stats["loss_per_epoch"]) == 2 and stats["loss"] == stats["loss_per_epoch"][-1]
    assert stats["loss"] > 0 and stats["best_metric_epoch"] == -1 and "total_time" in stats
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_model_saver_keeps_the_validated_model(tmp_path, monkeypatch):
    """A validation ran: model.pt stays the best validated weights (epoch 1), not the last ones."""
    import json

    from monai.bundle import ConfigParser

    parser = ConfigParser(_train_config(tmp_path, max_epochs=3, val_interval=1))
    snapshots = _train_with_weight_snapshots(parser)
    final = parser.get_parsed_content("final")
    assert final.saved is None and final.best_epoch == 1
    sd = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.testing.assert_close(sd["weight"], snapshots[0])
    assert not torch.equal(sd["weight"], snapshots[-1])
    stats = json.loads((tmp_path / "train_stats.json").read_text())
    assert stats["best_metric_epoch"] == 1 and stats["best_metric"] == 1.0 and stats["eval"]["key_metric_name"] == "m"
    # rank > 0 writes neither file
    monkeypatch.setattr(handlers, "_rank", lambda: 1)
    other = tmp_path / "rank1"
    parser = ConfigParser(_train_config(other, max_epochs=1, val_interval=5))
    parser.get_parsed_content("trainer").run()
    assert not other.exists() or not any(other.iterdir())


def test_learning_curve_recorder_snapshots_on_the_clock_with_counts(tmp_path, monkeypatch):
    import json

    net = torch.nn.Conv3d(1, 2, 1)
    clock = {"t": 0.0}
    monkeypatch.setattr(handlers.time, "perf_counter", lambda: clock["t"])

    def step(engine, batch):
        clock["t"] += 1.0  # one "second" of compute per iteration
        with torch.no_grad():
            net.weight.add_(1.0)
        return 0.0

    engine = Engine(step)
    rec = handlers.LearningCurveRecorder(tmp_path / "curve", every_s=3, network=net)
    rec.attach(engine)
    batches = [{"image": torch.zeros(2, 1, 4, 5, 6)}] * 4
    engine.run(batches, max_epochs=2)  # 8 iterations, 8 s: snapshots at 3 s, 6 s and the end (8 s)
    points = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert [p["file"] for p in points] == ["curve_0.pt", "curve_1.pt", "curve_2.pt"]
    assert [p["iteration"] for p in points] == [3, 6, 8] and [p["wall_s"] for p in points] == [3.0, 6.0, 8.0]
    assert [p["samples"] for p in points] == [6, 12, 16] and points[-1]["voxels"] == 16 * 120
    assert points[-1]["epoch"] == 2 and points[-1]["data_s"] == 0.0
    w = [torch.load(tmp_path / "curve" / p["file"], weights_only=True)["weight"].flatten()[0].item() for p in points]
    assert w[1] - w[0] == pytest.approx(3.0) and w[2] - w[1] == pytest.approx(2.0)  # each snapshot: the weights of its moment
    with pytest.raises(ValueError, match="every_s"):
        handlers.LearningCurveRecorder(tmp_path, every_s=0, network=net)


def test_model_saver_follows_the_best_validation(tmp_path):
    """A key metric that rises every validation: model.pt is rewritten each time and ends as the
    last validated weights; nothing else writes model.pt."""
    from monai.bundle import ConfigParser

    config = _train_config(tmp_path, max_epochs=3, val_interval=1)
    rising = "$(lambda c=[]: (lambda out: torch.tensor(float(c.append(1) or len(c)))))()"
    config["evaluator"]["key_val_metric"]["m"]["output_transform"] = rising
    parser = ConfigParser(config)
    snapshots = _train_with_weight_snapshots(parser)
    final = parser.get_parsed_content("final")
    assert final.best_epoch == 3 and final.saved is None
    torch.testing.assert_close(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], snapshots[-1])
    assert not torch.equal(snapshots[0], snapshots[-1])
