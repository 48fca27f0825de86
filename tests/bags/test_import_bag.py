"""lrm-import-bag: bags written here (MCAP, sqlite3) in, the recorder's own dataset layout out; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from bag_factory import MARKER_TOPIC, BagSpec, EpisodeSpec, feed_live, level_at, truncate, write_bag

from lrm_reward.bags.import_cli import main
from lrm_reward.bags.importer import (
    EXIT_NOTHING,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    ImportConfig,
    ImportRefused,
    import_bags,
)
from lrm_reward.bags.mapping import MappingSpec, TopicSpec
from lrm_reward.refinement.recorder import EpisodeRecorder, RecorderConfig, SaveStatus, plan_resampling

STORAGES = ["mcap", "sqlite3"]
MARKED = dict(split="marker", marker=MARKER_TOPIC, marker_at="end")


def spec_of(**kw) -> MappingSpec:
    return MappingSpec(**{"fps": 10, "cameras": {"front": "/camera/image"}, **kw})


def do_import(bags, out: Path, mapping: MappingSpec, **kw):
    cfg = ImportConfig(out, mapping, image_writer_threads=0, **{"use_videos": False, **kw})
    return import_bags([Path(b) for b in bags], cfg)


def load(root: Path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset(f"lrm/{root.name}", root=root, video_backend="pyav")


def frames(root: Path) -> pd.DataFrame:
    return pd.concat(pd.read_parquet(p) for p in sorted((root / "data").rglob("*.parquet")))


def sidecar(root: Path, index: int) -> dict:
    return json.loads((root / "recording" / f"episode_{index:06d}.json").read_text())


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".") and ".import-" in p.name]


# ------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("storage", STORAGES)
def test_an_imported_bag_is_what_the_recorder_writes_live(tmp_path, storage):
    spec = BagSpec(
        storage=storage,
        episodes=[EpisodeSpec(final_level=220), EpisodeSpec(final_level=60, success=False, task="stack")],
        environment_state=True,
        reward_hz=5,
        marker="result",
    )
    bag = write_bag(tmp_path / "bag", spec)
    report = import_bags(
        [bag], ImportConfig(tmp_path / "imported", spec_of(**MARKED), image_writer_threads=0)
    )
    assert report.exit_code() == EXIT_OK, report.message
    assert [(e.status, e.num_frames, e.task) for e in report.episodes] == [
        ("imported", 20, "put the cube in the bowl"),
        ("imported", 20, "stack"),
    ]

    live = EpisodeRecorder(
        RecorderConfig(
            data_root=tmp_path, cameras=("front",), fps=10, dataset_name="live", image_writer_threads=0,
            environment_state_names=None,
        )
    )  # fmt: skip
    for e, outcome in enumerate(("success", "failure")):
        live.start(spec.episodes[e].task)
        feed_live(live, spec, e)
        assert live.stop(outcome).status is SaveStatus.SAVED
    live.close()

    imported, recorded = tmp_path / "imported", tmp_path / "live"
    info_i = json.loads((imported / "meta" / "info.json").read_text())
    info_r = json.loads((recorded / "meta" / "info.json").read_text())
    assert info_i["features"] == info_r["features"]
    assert {k: v for k, v in info_i.items() if k != "features"} == {
        k: v for k, v in info_r.items() if k != "features"
    }
    a, b = frames(imported), frames(recorded)
    for column in ("observation.state", "action", "observation.environment_state", "reward.progress"):
        np.testing.assert_array_equal(np.stack(a[column].to_numpy()), np.stack(b[column].to_numpy()))
    for e in range(2):
        side_i, side_r = sidecar(imported, e), sidecar(recorded, e)
        assert side_i.keys() - side_r.keys() == {"provenance"}
        for key in ("num_frames", "dataset_t0_s", "received", "dropouts", "partial", "task", "outcome"):
            assert side_i[key] == side_r[key], key
        prov = side_i["provenance"]
        assert prov["bag"] == str(bag.resolve()) and prov["storage"] == storage
        assert prov["topics"]["observation.images.front"] == "/camera/image"
        assert prov["marker"] == MARKER_TOPIC and prov["bag_time_range_ns"][0] <= prov["window_ns"][0]
    ds_i, ds_r = load(imported), load(recorded)  # stock lerobot reads both; same pixels (same encoder)
    assert ds_i.meta.total_episodes == 2 and ds_i.meta.camera_keys == ["observation.images.front"]
    for index in (0, 19, 25, 39):
        np.testing.assert_array_equal(
            ds_i[index]["observation.images.front"].numpy(), ds_r[index]["observation.images.front"].numpy()
        )
    report_file = json.loads((imported / "recording" / "import.json").read_text())
    assert [e["status"] for e in report_file["episodes"]] == ["imported", "imported"]
    assert no_leftovers(tmp_path)


def test_stamps_since_the_epoch_on_the_frame_grid_keep_every_frame():
    # A robot (and sim_robot_node) stamps frames k/fps apart in seconds since the epoch; float64 resolves
    # those to ~0.24 us, so the resampling must not lose the last frame or pick the previous sample.
    t0 = 1796404429.385661754
    stamps = np.array([int(t) + round((t - int(t)) * 1e9) * 1e-9 for t in (t0 + k * 0.1 for k in range(9))])
    plan = plan_resampling({"camera": stamps, "state": stamps + 2e-7}, {}, fps=10, max_gap_s=0.5)
    assert plan.num_frames == 9
    assert list(plan.indices["camera"]) == list(range(9)) and list(plan.indices["state"]) == list(range(9))


def test_compressed_cameras_float_array_actions_gap_split_and_a_task_topic(tmp_path):
    spec = BagSpec(
        storage="sqlite3",
        cameras={"front": "/front/image_raw/compressed", "wrist": "/wrist/image/compressed"},
        compressed={"/front/image_raw/compressed": "jpeg", "/wrist/image/compressed": "png"},
        action_type="float64_multi_array",
        episodes=[EpisodeSpec(task="pick", gap_before_s=0.5), EpisodeSpec(task="place", gap_before_s=3.0)],
        task_topic=True,
    )
    bag = write_bag(tmp_path / "bag", spec)
    mapping = MappingSpec(fps=10, split="gap", gap_s=1.0)  # cameras, state, action, task: by type and name
    report = do_import([bag], tmp_path / "ds", mapping)
    assert report.exit_code() == EXIT_OK, report.message
    assert [(e.task, e.num_frames) for e in report.episodes] == [("pick", 20), ("place", 20)]
    ds = load(tmp_path / "ds")
    assert sorted(ds.meta.camera_keys) == ["observation.images.front", "observation.images.wrist"]
    assert ds.meta.features["action"]["names"] == ["action_0", "action_1", "action_2", "action_3"]
    last = ds[19]
    assert abs(float(last["observation.images.front"].mean()) * 255 - level_at(1.9)) < 3  # JPEG: close
    assert round(float(last["observation.images.wrist"].mean()) * 255) == level_at(1.9) + 3  # PNG: exact


def test_several_bags_one_episode_each_into_one_dataset(tmp_path):
    bags = [
        write_bag(tmp_path / "a", BagSpec(storage="mcap")),
        write_bag(tmp_path / "b", BagSpec(storage="sqlite3", episodes=[EpisodeSpec(duration_s=1.0)])),
    ]
    report = do_import(bags, tmp_path / "ds", spec_of(task="sort the blocks"))
    assert report.exit_code() == EXIT_OK
    assert [e.num_frames for e in report.episodes] == [20, 10]
    assert [sidecar(tmp_path / "ds", i)["provenance"]["storage"] for i in (0, 1)] == STORAGES
    assert load(tmp_path / "ds").meta.total_episodes == 2


def test_an_episode_without_a_task_is_refused_by_name(tmp_path):
    bag = write_bag(tmp_path / "bag", BagSpec())
    report = do_import([bag], tmp_path / "ds", spec_of())
    assert report.dataset is None and "no task" in report.message
    assert not (tmp_path / "ds").exists() and no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("storage", STORAGES)
def test_a_truncated_bag_is_named_and_the_other_bags_are_kept(tmp_path, storage):
    good = write_bag(tmp_path / "good", BagSpec(storage=storage))
    bad = truncate(write_bag(tmp_path / "bad", BagSpec(storage=storage)))
    alone = do_import([bad], tmp_path / "nothing", spec_of(task="t"))
    assert alone.dataset is None and alone.exit_code() == EXIT_NOTHING
    assert str(bad) in alone.message and "cannot open the bag" in alone.message
    assert not (tmp_path / "nothing").exists() and no_leftovers(tmp_path)

    both = do_import([good, bad], tmp_path / "ds", spec_of(task="t"))
    assert both.exit_code() == EXIT_SOME_FAILED
    assert [b.error is None for b in both.bags] == [True, False]
    assert load(tmp_path / "ds").meta.total_episodes == 1
    saved = json.loads((tmp_path / "ds" / "recording" / "import.json").read_text())
    assert "cannot open the bag" in saved["bags"][1]["error"]


BAD_MESSAGES = {
    # fault -> (bag options, topic named in the error, words of the error)
    "corrupt JPEG": (
        {"compressed": {"/camera/image": "jpeg"}, "faults": {"corrupt_jpeg_at": (1, "front", 7)}},
        "/camera/image",
        "corrupt_compressed",
    ),
    "short image": ({"faults": {"short_image_at": (1, "front", 7)}}, "/camera/image", "truncated"),
    "unknown encoding": (
        {"faults": {"bad_encoding_at": (1, "front", 7)}},
        "/camera/image",
        "unknown_encoding",
    ),
    "stamps backwards": ({"faults": {"state_backwards_at": (1, 30)}}, "/joint_states", "stamps out of order"),
    "undecodable payload": ({"faults": {"garbage_at": ("/action", 50)}}, "/action", "does not deserialize"),
}


@pytest.mark.parametrize("fault", list(BAD_MESSAGES))
def test_a_bad_message_fails_its_episode_only_naming_topic_and_time(tmp_path, fault):
    options, topic, words = BAD_MESSAGES[fault]
    episodes = [EpisodeSpec(), EpisodeSpec(final_level=90), EpisodeSpec(final_level=150)]
    bag = write_bag(tmp_path / "bag", BagSpec(storage="mcap", episodes=episodes, marker="result", **options))
    report = do_import([bag], tmp_path / "ds", spec_of(**MARKED))
    assert report.exit_code() == EXIT_SOME_FAILED
    assert [e.status for e in report.episodes] == ["imported", "failed", "imported"]
    failed = report.failed[0]
    assert failed.topic == topic and failed.time_ns is not None
    assert topic in failed.message and words in failed.message and "t=1700000" in failed.message
    assert load(tmp_path / "ds").meta.total_episodes == 2
    assert [sidecar(tmp_path / "ds", i)["num_frames"] for i in (0, 1)] == [20, 20]


def test_bad_messages_can_be_skipped_and_counted_instead(tmp_path):
    options, topic, _ = BAD_MESSAGES["corrupt JPEG"]
    bag = write_bag(
        tmp_path / "bag", BagSpec(episodes=[EpisodeSpec(), EpisodeSpec()], marker="result", **options)
    )
    report = do_import([bag], tmp_path / "ds", spec_of(on_bad_message="skip", **MARKED))
    assert report.exit_code() == EXIT_OK
    assert sidecar(tmp_path / "ds", 1)["provenance"]["skipped_messages"] == {topic: 1}


def test_strict_writes_nothing_when_one_episode_fails(tmp_path):
    options, _, _ = BAD_MESSAGES["stamps backwards"]
    bag = write_bag(
        tmp_path / "bag", BagSpec(episodes=[EpisodeSpec(), EpisodeSpec()], marker="result", **options)
    )
    report = do_import([bag], tmp_path / "ds", spec_of(**MARKED), strict=True)
    assert report.dataset is None and "strict" in report.message and "stamps out of order" in report.message
    assert not (tmp_path / "ds").exists() and no_leftovers(tmp_path)


def test_unknown_types_and_missing_topics_are_named_and_only_matter_when_mapped(tmp_path):
    blob = [(1_700_000_001.5, "/lidar", "acme_msgs/msg/Blob", b"\x00\x01\x00\x00" + bytes(8))]
    bag = write_bag(tmp_path / "bag", BagSpec(), extra=blob)
    ok = do_import([bag], tmp_path / "ok", spec_of(task="t"))  # /lidar is not mapped: no matter
    assert ok.exit_code() == EXIT_OK
    as_camera = do_import([bag], tmp_path / "cam", MappingSpec(task="t", cameras={"front": "/lidar"}))
    assert as_camera.dataset is None
    assert "/lidar (mapped as camera front) has message type acme_msgs/msg/Blob" in as_camera.message
    missing = do_import([bag], tmp_path / "miss", spec_of(task="t", action=TopicSpec("/leader/joint_states")))
    assert "/leader/joint_states (mapped as action) is not in the bag" in missing.message
    assert not (tmp_path / "cam").exists() and not (tmp_path / "miss").exists() and no_leftovers(tmp_path)


def test_an_existing_output_is_never_touched_and_a_killed_import_is_cleaned_up(tmp_path):
    bag = write_bag(tmp_path / "bag", BagSpec())
    (tmp_path / "ds").mkdir()
    with pytest.raises(ImportRefused, match="exists already"):
        do_import([bag], tmp_path / "ds", spec_of(task="t"))
    stale = tmp_path / ".new.import-999999999"  # a killed import's staging folder (no such process)
    stale.mkdir()
    assert do_import([bag], tmp_path / "new", spec_of(task="t")).exit_code() == EXIT_OK
    assert not stale.exists()


# ------------------------------------------------------------------------------------------ command
def test_command_line_exit_codes_and_dry_run(tmp_path, capsys):
    bag = write_bag(tmp_path / "bag", BagSpec(episodes=[EpisodeSpec(), EpisodeSpec()], marker="result"))
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("fps: 10\ncameras: {front: /camera/image}\nepisodes: {marker_at: end}\n")
    common = [str(bag), "--mapping", str(mapping), "--marker", MARKER_TOPIC]
    assert main([*common, "--output", str(tmp_path / "dry"), "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "observation.images.front" in out and "episode 1:" in out and not (tmp_path / "dry").exists()
    assert main([*common, "--output", str(tmp_path / "ds"), "--no-videos"]) == EXIT_OK
    assert "imported 2 episode(s), 40 frames" in capsys.readouterr().out
    assert main([*common, "--output", str(tmp_path / "ds")]) == EXIT_USAGE  # exists
    mapping.write_text("fps: ten\n")
    assert main([*common, "--output", str(tmp_path / "x")]) == EXIT_USAGE
    assert "fps must be an integer" in capsys.readouterr().err


def test_a_bag_that_breaks_off_mid_read_fails_the_episode_it_was_reading(tmp_path, monkeypatch):
    from rosbags.highlevel import AnyReader

    bag = write_bag(tmp_path / "bag", BagSpec(episodes=[EpisodeSpec(), EpisodeSpec()], marker="result"))
    original = AnyReader.messages

    def breaks_off(self, connections=(), start=None, stop=None):
        for n, item in enumerate(original(self, connections, start=start, stop=stop)):
            if start is not None and start > 1_700_000_003_000_000_000 and n == 30:  # episode 1
                raise OSError("database disk image is malformed")  # what apsw says of a bad page
            yield item

    monkeypatch.setattr(AnyReader, "messages", breaks_off)
    report = do_import([bag], tmp_path / "ds", spec_of(**MARKED))
    assert [e.status for e in report.episodes] == ["imported", "failed"]
    failed = report.failed[0]
    assert "truncated or corrupt after the message" in failed.message and "malformed" in failed.message
    assert failed.time_ns is not None and "t=1700000" in failed.message
