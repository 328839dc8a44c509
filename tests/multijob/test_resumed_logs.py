"""The run's log history after a resume (`multijob.lifecycle.resumed_log_history`): each job's saved entries, an
entry of several jobs once, an unreadable file left out (the whole resume is tested in test_resume.py)."""


def test_resumed_log_histories_hold_an_entry_of_several_jobs_once_and_skip_an_unreadable_file(tmp_path, caplog):
    """`evaluate()` logs every job's eval loss in one entry, which each job's checkpoint keeps: the resumed history
    holds it once, in step order. An unreadable `log_history.json` leaves its entries out with a warning instead of
    stopping the resume (the logs are a record, not what training resumes from)."""
    from types import SimpleNamespace

    from peft_mole.multijob.lifecycle import read_logs, resumed_log_history

    shared = {"a/eval_loss": 1.0, "b/eval_loss": 2.0, "step": 2}
    runs = [SimpleNamespace(resumed_logs=[{"a/loss": 3.0, "step": 1}, shared]),
            SimpleNamespace(resumed_logs=[{"b/loss": 4.0, "step": 1}, dict(shared), {"b/loss": 5.0, "step": 3}])]
    assert resumed_log_history(runs) == [{"a/loss": 3.0, "step": 1}, {"b/loss": 4.0, "step": 1}, shared,
                                         {"b/loss": 5.0, "step": 3}]
    (tmp_path / "log_history.json").write_text('[{"a/loss": 3.0, "st')
    with caplog.at_level("WARNING"):
        assert read_logs(str(tmp_path)) == []
    assert "log_history.json cannot be read" in caplog.text
