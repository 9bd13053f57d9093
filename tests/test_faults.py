"""The fault-injection script, small: one trial killed with SIGKILL inside an asynchronous checkpoint
save, resumed, and compared bitwise with the uninterrupted run (`mmjax/benchmarks/fault_injection.py`;
20 trials by hand, in docs/results.md)."""

import json

from mmjax.benchmarks import fault_injection


def test_a_run_killed_inside_a_save_resumes_to_the_same_parameters(tiny_builder, tmp_path, capsys):
    code = fault_injection.main([f"--workdir={tmp_path}", "--trials=1", "--moments=save", "--",
                                 f"--config.data.data_dir={tiny_builder.data_dir_root}"])
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "fault_injection.json").read_text())
    (trial,) = summary["trials"]
    assert trial["killed"] and trial["relaunches"] == 1, (trial, out)  # it died inside the save, then resumed
    assert trial["differences"] == [] and code == 0, out
    assert "1 of 1 trials ended bitwise equal to the uninterrupted run (1 killed" in out
