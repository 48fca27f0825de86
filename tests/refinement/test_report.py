"""Refinement report: HTML + PNG plots + text summary from a run's selection, losses and the store history."""

from __future__ import annotations

from lrm_reward.refinement.policy_store import PolicyStore, PolicyVersion
from lrm_reward.refinement.refine import Selection
from lrm_reward.refinement.report import summary_text, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(ds, e, source="judged", **kw):
    return {"dataset": ds, "episode_index": e, "source": source, **kw}


def test_report_has_plots_table_and_summary(tmp_path):
    store = PolicyStore(tmp_path, "act_pick")
    (store.dir / "v0003").mkdir(parents=True)
    version = PolicyVersion("act_pick", "v0003", store.dir / "v0003")
    for night, kept, rejected in (("2026-11-24", 3, 5), ("2026-11-25", 4, 2), ("2026-11-26", 2, 1)):
        store.append_history(
            {"run_at": f"{night}T23:30:00", "version": "v", "kept": kept, "rejected": rejected}
        )
    curve = {"curve": [0.1, 0.5, 0.9], "curve_frames": [0, 10, 19]}
    selection = Selection(
        episodes={"/data/night": [0, 2], "/data/demos": [0]},
        kept=[
            _row("/data/night", 0, verdict="success", confidence=0.91, task="stack <cups>", **curve),
            _row("/data/night", 2, verdict="success", confidence=0.8, task="stack <cups>", **curve),
            _row("/data/demos", 0, source="demo"),
        ],
        rejected=[
            _row(
                "/data/night",
                1,
                verdict="failure",
                confidence=0.7,
                reason="verdict failure",
                curve=[0.1, 0.2],
                curve_frames=[0, 19],
            ),
        ],
    )
    losses = [2.0, 1.5, 1.1, 0.9]
    index = write_report(store, version, selection, losses)

    assert index == store.dir / "reports" / "v0003" / "index.html"
    for name in ("rewards.png", "nights.png", "loss.png"):
        data = (index.parent / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
        assert f'src="{name}"' in index.read_text()
    page = index.read_text()
    assert page.count("<tr>") == 1 + 4  # header + every kept and rejected episode
    assert "stack &lt;cups&gt;" in page  # task text is escaped
    assert "rejected: verdict failure" in page
    summary = (index.parent / "summary.txt").read_text()
    assert "episodes used: 3 (2 judged successes, 1 demonstrations)" in summary
    assert "episodes rejected: 1 (verdict failure: 1)" in summary
    assert "loss 2.0000 -> 0.9000" in summary
    assert "successes kept per run: [3, 4, 2]" in summary
    assert not any((store.dir / "v0003").iterdir())  # the version folder itself is not touched


def test_summary_without_history_or_losses():
    version = PolicyVersion("p", "v0001", None)
    text = summary_text(version, Selection(episodes={}, kept=[], rejected=[]), [], [])
    assert text.splitlines() == [
        "policy p/v0001",
        "episodes used: 0 (0 judged successes, 0 demonstrations)",
        "episodes rejected: 0",
    ]


def test_report_shows_how_the_judge_agreed_with_the_operator(tmp_path):
    from types import SimpleNamespace

    from lrm_reward.refinement.calibration import calibrate, write_calibration

    night = tmp_path / "data" / "night"
    labelled = [
        SimpleNamespace(
            episode_index=e, recorded_outcome=label, completion_prob=p, final_progress=1.0, verdict="x"
        )
        for e, label, p in ((0, "success", 0.9), (1, "failure", 0.2), (2, "success", 0.4))
    ]
    write_calibration(night, calibrate(labelled, success_threshold=0.5))
    store = PolicyStore(tmp_path / "store", "act_pick")
    (store.dir / "v0001").mkdir(parents=True)
    version = PolicyVersion("act_pick", "v0001", store.dir / "v0001")
    selection = Selection(
        episodes={str(night): [0]},
        kept=[_row(str(night), 0, verdict="success", confidence=0.9)],
        rejected=[_row(str(night), 1, verdict="failure", confidence=0.8, reason="verdict failure")],
    )
    index = write_report(store, version, selection, [1.0, 0.5])
    summary = (index.parent / "summary.txt").read_text()
    assert "judge vs operator, night: operator labels on 3 episodes (2 success, 1 failure)" in summary
    assert "agrees on 2 (TP 1 FP 0 FN 1 TN 1)" in summary
    assert (index.parent / "calibration_night.png").read_bytes().startswith(PNG_MAGIC)
    assert 'src="calibration_night.png"' in index.read_text()
