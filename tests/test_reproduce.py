"""The plateau rule of the ablation profile: 2N gains less than 1 AP point on every seed."""

import math

from sodlib.studies.experiments import plateau_frame, plateau_iterations


def _m(ap):
    return {"AP": ap, "AP50": 2 * ap, "APS": ap / 2, "train_seconds": 10.0}


def test_plateau_is_the_shortest_schedule_whose_doubling_gains_under_one_point():
    runs = [
        (1000, 0, _m(0.30), "a"),
        (1000, 1, _m(0.31), "b"),
        (2000, 0, _m(0.335), "c"),
        (2000, 1, _m(0.318), "d"),
        (4000, 0, _m(0.34), "e"),
        (4000, 1, _m(0.325), "f"),
    ]
    df = plateau_frame(runs)
    gains = dict(zip(zip(df["iterations"], df["seed"]), df["gain_2x"]))
    assert gains[(1000, 0)] == 3.5 and gains[(1000, 1)] == 0.8  # one seed still gains 3.5 points
    assert gains[(2000, 0)] == 0.5 and gains[(2000, 1)] == 0.7
    assert math.isnan(gains[(4000, 0)])  # no 8000-iteration run
    assert plateau_iterations(df) == 2000
    assert plateau_iterations(df, max_gain=0.6) is None  # 2000 -> 4000 still gains 0.7 on seed 1
