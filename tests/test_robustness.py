"""Shapley values over modalities on games with known values; the batch alterations."""

import numpy as np
import pytest

from mmjax.evaluation import robustness


def test_shapley_of_additive_and_interaction_games():
    names = ("a", "b", "c")
    additive = {s: sum({"a": 1.0, "b": 2.0, "c": 4.0}[m] for m in s) for s in robustness.subsets(names)}
    phi = robustness.shapley(additive, names)
    assert {m: float(v) for m, v in phi.items()} == pytest.approx({"a": 1.0, "b": 2.0, "c": 4.0})
    both = {s: float({"a", "b"} <= set(s)) for s in robustness.subsets(names)}  # a and b only together
    phi = robustness.shapley(both, names)
    assert {m: float(v) for m, v in phi.items()} == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.0})


@pytest.mark.parametrize("m", [1, 2, 4, 6])
def test_shapley_efficiency_and_symmetry_on_a_random_game(m):
    rng = np.random.default_rng(m)
    names = tuple("abcdef"[:m])
    game = {s: rng.normal(size=5) for s in robustness.subsets(names)}  # 5 "patients"
    phi = robustness.shapley(game, names)
    np.testing.assert_allclose(sum(phi.values()), game[names] - game[()], atol=1e-12)
    assert len(robustness.subsets(names)) == 2**m
    # symmetry: a and b interchangeable in the game -> equal values; c a dummy (adds nothing) -> 0
    sym = {s: float(len({"a", "b"} & set(s)) ** 2) for s in robustness.subsets(("a", "b", "c"))}
    phi = robustness.shapley(sym, ("a", "b", "c"))
    assert float(phi["a"]) == pytest.approx(float(phi["b"])) == pytest.approx(2.0) and float(phi["c"]) == 0.0
    with pytest.raises(ValueError, match="at most 6"):
        robustness.shapley({}, tuple("abcdefg"))


def test_hide_noise_and_patient_fractions():
    batch = {"x": {"values": np.zeros((4, 3), np.float32), "mask": np.array([[1, 1, 0]] * 4, bool),
                   "present": np.array([True, True, False, True])}, "patient_id": np.array(["p0", "p1", "p2", "p3"])}
    hidden = robustness.hide(batch, ["x"], rows=np.array([True, False, False, False]))
    np.testing.assert_array_equal(hidden["x"]["present"], [False, True, False, True])
    assert batch["x"]["present"][0]  # the input is not changed
    noisy = robustness.add_noise(batch, "x", 1.0, seed=0)
    assert np.all(noisy["x"]["values"][:, 2] == 0) and np.all(noisy["x"]["values"][:, :2] != 0)  # masked stays
    ids = np.array([f"p{i}" for i in range(4000)])
    u = robustness.patient_fraction(ids, "x")
    assert abs(np.mean(u < 0.25) - 0.25) < 0.03 and np.array_equal(u, robustness.patient_fraction(ids, "x"))
    assert not np.array_equal(u, robustness.patient_fraction(ids, "y"))  # modalities drop different patients
