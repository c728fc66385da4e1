"""The HHL case type (``hpcqml.hhl.case``): the truncated sweep stores eq. II.92, the exact eq. II.87
overlap, the Haar estimate (eq. II.89-II.91) and the simulated truncated-HHL overlap per kappa_a, each
checked against an independent numpy computation on small Carleman systems; the layout round-trips
through the results store's atomic commit; the II.92/II.87 table says where and why they disagree.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import truncation_reference

from hpcqml.hhl.case import II92_TOLERANCE, HHLCase, Part, TruncatedSweep, read_cases
from hpcqml.hhl.statevector import embed, simulate_hhl
from hpcqml.hhl.truncated import measured_overlap

C = 7   # clock qubits of the simulated runs


def _carleman(f: float, seed: int, eta: float, T: int, N: int = 2):
    """(M, B, eigenvalues of A) of a random n = 3 quadratic instance (paper Sec. III C)."""
    from hpcqml.carleman import reference as ref
    from hpcqml.carleman.cases import random_instance

    ode = random_instance("random", 3, f, seed, eta=eta, u_scale=0.1, div_range=0.05)
    A = ref.carleman_matrix(ode, N)
    M, B = ref.block_system(A, ode, N, T)
    return M.toarray(), np.asarray(B, dtype=np.float64), np.linalg.eigvals(A.toarray())


def _independent(M: np.ndarray, B: np.ndarray, a: np.ndarray, T: int, kappa: float) -> dict[str, float]:
    """Eq. II.87, II.89-II.91 (conftest's ``truncation_reference``) and II.92 from scratch: the dilation
    [[0, M], [M^T, 0]] / ||M||_2 with b = (B, 0)/||B||, its eigen-decomposition by numpy, and the mode
    counts of A (|1 + a| < 1, eq. II.28)."""
    n = M.shape[0]
    H = np.block([[np.zeros((n, n)), M], [M.T, np.zeros((n, n))]]) / np.linalg.norm(M, 2)
    lam, V = np.linalg.eigh(H)
    beta = V.T @ (np.concatenate([B, np.zeros(n)]) / np.linalg.norm(B))
    diss = np.abs(1 + a) < 1
    d_plus, d_all = int(np.count_nonzero(diss)), a.size
    a_plus = float(np.mean(a[diss].real))
    G = sum((1 + a_plus) ** t for t in range(T + 1))
    ii92 = d_plus * G / np.sqrt((T + 1) * d_all * (d_plus * G + (T + 1) * (d_all - d_plus)))
    return {**truncation_reference(lam, beta, kappa), "ii92": ii92, "d_plus": d_plus, "d_all": d_all,
            "a_plus": a_plus}


def _sweep(M, B, a, T, kappas, states=None):
    """The stage's way: simulate truncated HHL at each kappa_a and build the sweep with the split of A.
    ``states``: a list that receives each run's well-flagged state vector <well|x~>."""
    from hpcqml.hhl.truncated import dissipative_split
    from hpcqml.modes import overlap_ii92, overlap_ii93

    system = embed(M, B)
    x = system.embed_solution(np.linalg.solve(M, B))
    rows = []
    for k in kappas:
        r = simulate_hhl(system, C, kappa_a=k)
        if states is not None:
            states.append(np.asarray(r.state_well))
        rows.append({"c": C, "kappa_a": k, "overlap": measured_overlap(r, x), "p_success": r.p_success,
                     "leakage": r.leakage, "resolution": 2 * np.pi / (r.t0 * 2**C)})
    d_plus, d_all, a_plus = dissipative_split(a)
    o92, o93 = overlap_ii92(d_plus, d_all, a_plus, T), float(overlap_ii93(d_plus, d_all))
    split = {"Delta_plus": d_plus, "Delta": d_all, "a_plus": a_plus, "overlap_ii92": o92, "overlap_ii93": o93,
             "fidelity_ii92": o92**2, "fidelity_ii93": o93**2}
    return TruncatedSweep.build(rows, system, split, T)


@pytest.mark.parametrize(("f", "seed"), [(1.0, 0), (0.5, 3)])
def test_sweep_columns_match_independent_numpy(f, seed):
    """Per kappa_a (3, which truncates a third of |b>'s weight; the paper's 2(T+1); 40): II.87 and the Haar
    estimate to 1e-12 of the numpy recomputation, II.92 to 1e-12, the simulated overlap within the
    phase-estimation error of II.87 (every occupied eigenvalue here lies more than 2.9 clock bins from
    the threshold; measured |simulated - II.87| <= 3e-3 at c = 7, the bound used is 1e-2), the stored
    fidelities equal to 1e-12 to the squares of the numpy values and, for the simulated one, to
    |<x|<well|x~>|^2 of the solution numpy solves (placed in the x block of the dilation) against the
    simulated state vector, and ii92_applies only on the paper's kappa_a."""
    T = 4
    M, B, a = _carleman(f, seed, 0.25, T)
    assert not np.allclose(M, M.T)          # the embedding is the dilation [[0, M], [M^T, 0]]: x sits second
    kappas = [3.0, 2.0 * (T + 1), 40.0]
    states: list[np.ndarray] = []
    sw = _sweep(M, B, a, T, kappas, states)
    n = M.shape[0]
    for i, k in enumerate(kappas):
        ref = _independent(M, B, a, T, k)
        assert sw["overlap_ii87"][i] == pytest.approx(ref["ii87"], abs=1e-12)
        assert sw["overlap_haar"][i] == pytest.approx(ref["haar"], abs=1e-12)
        assert sw["overlap_ii92"][i] == pytest.approx(ref["ii92"], rel=1e-12)
        assert sw["ill_weight"][i] == pytest.approx(ref["ill"], abs=1e-12)
        assert sw["threshold_margin"][i] > 2.9 * sw["resolution"][i]
        assert abs(sw["overlap"][i] - ref["ii87"]) < 1e-2
        x_ref = np.zeros(states[i].size)
        x_ref[n:2 * n] = np.linalg.solve(M, B)
        simulated = abs(np.sum(x_ref * states[i])) ** 2 / np.sum(x_ref**2)     # x_ref is real
        assert sw["fidelity"][i] == pytest.approx(simulated, abs=1e-12)
        assert sw["fidelity_ii87"][i] == pytest.approx(ref["ii87"] ** 2, abs=1e-12)
        assert sw["fidelity_haar"][i] == pytest.approx(ref["haar"] ** 2, abs=1e-12)
        assert sw["fidelity_ii92"][i] == pytest.approx(ref["ii92"] ** 2, rel=1e-12)
    assert list(sw["ii92_applies"]) == [False, True, False]
    assert sw.attrs["kappa_a_paper"] == 2.0 * (T + 1)
    assert sw["ill_weight"][0] > 0.3        # kappa_a = 3 does truncate something here


def test_table_records_where_ii92_and_ii87_disagree_and_why():
    """f = 1 (Delta_- = 0), step 0.25: at kappa_a = 2(T+1) nothing is truncated, II.87 = 1 and II.92 =
    sqrt(G/(T+1)) < 1 (numpy: 0.87 at T = 4): a disagreement, with the reason 'nothing is truncated'.
    Step 1e-7 (a_+ -> 0): the two agree within the tolerance, the common limit of the paper."""
    T = 4
    M, B, a = _carleman(1.0, 0, 0.25, T)
    ref = _independent(M, B, a, T, 2.0 * (T + 1))
    (row,) = _sweep(M, B, a, T, [2.0 * (T + 1)]).ii92_rows()
    assert ref["ill"] <= 1e-14 and ref["d_plus"] == ref["d_all"]
    assert row["ii87"] == pytest.approx(1.0, abs=1e-12) and row["ii92"] == pytest.approx(ref["ii92"], rel=1e-12)
    assert row["gap"] == pytest.approx(ref["ii92"] - 1.0, abs=1e-12) and row["gap"] < -II92_TOLERANCE
    assert not row["agree"] and row["reason"].startswith("nothing is truncated") and "|" not in row["reason"]
    assert "decay of the dissipative modes" in row["reason"] and "Δ₊ = 12 of Δ = 12" in row["reason"]

    M, B, a = _carleman(1.0, 0, 1e-7, T)
    (row,) = _sweep(M, B, a, T, [2.0 * (T + 1)]).ii92_rows()
    assert row["agree"] and row["reason"] == f"agree within {II92_TOLERANCE:g}"


def test_case_round_trips_through_the_store_commit(tmp_path):
    """HHLCase.to_group inside ResultsStore.commit, then from_group and read_cases: every dataset with its
    units and description, every attribute, and the sweep's II.92 table identical after reading back."""
    from hpcqml.parallel import world
    from hpcqml.store import ResultsStore

    T = 3
    M, B, a = _carleman(0.5, 1, 0.25, T)
    sw = _sweep(M, B, a, T, [2.0, 2.0 * (T + 1)])
    inst = Part()
    inst.add("rhs", B, "1", "right-hand side B")
    inst.attrs.update({"T": T, "system_size": B.size})
    plain = Part()
    plain.add("clock_qubits", np.array([C]), "count", "clock register size c")
    plain.add("fidelity", np.array([0.99]), "1", "fidelity")
    case = HHLCase(attrs={"case": "random", "method": "statevector"}, instance=inst, hhl=plain, truncated=sw,
                   resources=Part(attrs={"kappa": 12.5}), readout=None)
    store = ResultsStore(tmp_path / "r.h5", world())
    store.open_run("x = 1", "sha", {"command_line": "t"})
    store.commit("hhl/random", case.to_group)
    store.close_run("completed")
    with h5py.File(tmp_path / "r.h5", "r") as fh:
        back = read_cases(fh)["random"]
        assert fh["hhl/random/truncated/overlap_ii87"].attrs["units"] == "1"
    assert back.name == "random" and back.method == "statevector" and back.readout is None
    for name, (data, units, desc) in sw.arrays.items():
        got, got_units, got_desc = back.truncated.arrays[name]
        np.testing.assert_array_equal(got, data)
        assert (got_units, got_desc) == (units, desc)
    assert {k: back.truncated.attrs[k] for k in sw.attrs} == sw.attrs
    assert back.truncated.ii92_rows() == sw.ii92_rows()
    assert back.instance.attrs["T"] == T and back.resources.attrs["kappa"] == 12.5


def test_file_system_sweep_has_no_ii92_rows():
    """A file system has no Carleman matrix: no eq. II.92 column, no table row, the other columns stored."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    M = Q @ np.diag([0.2, 0.5, -0.7, 1.0]) @ Q.T
    B = rng.standard_normal(4)
    system = embed(M, B)
    x = system.embed_solution(np.linalg.solve(M, B))
    r = simulate_hhl(system, 5, kappa_a=3.0)
    sw = TruncatedSweep.build([{"c": 5, "kappa_a": 3.0, "overlap": measured_overlap(r, x), "p_success": r.p_success,
                                "leakage": r.leakage, "resolution": 0.1}], system)
    assert "overlap_ii92" not in sw and "overlap_ii87" in sw and sw.ii92_rows() == []
