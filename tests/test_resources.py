"""Resource formulas (eq. I.1, I.2, II.13, II.77, II.83, II.94, tomography, state preparation) by hand."""
import math

import numpy as np
import pytest
import scipy.sparse as sp

from hpcqml.errors import UserError
from hpcqml.hhl import resources as res


def test_hand_computed_case():
    # n = 4, N = 2, T = 3: Delta = 4 + 16 = 20, (T+1) Delta = 80 -> 7 qubits, +1 for the dilation
    assert res.carleman_dim(4, 2) == 20  # the Carleman module's own function (eq. II.13)
    assert res.system_qubits(4, 2, 3, dilated=False) == 7
    assert res.system_qubits(4, 2, 3) == 8
    # s = 3, q = 2, T = 3: s q T = 18, (s q T)^2 = 324
    L = res.log_term(0.5, [0.0, 0.2, 0.3, 0.1], 0.6)
    # 2/ln 2 * ln(3 * (1*0.3 + 2*0.1) / 0.6) = 2.8853900818 * ln 2.5 = 2.6438561898
    assert L == pytest.approx(2.6438561898, rel=1e-9)
    i1 = res.gate_complexity("I.1", s=3, q=2, T=3, m=2, eps=0.1, L=L)
    i2 = res.gate_complexity("I.2", s=3, q=2, T=3, m=2, eps=0.1, L=L)
    assert i1["prefactor"] == 18 and i2["prefactor"] == 324
    assert i1["poly_args"] == {"m": 2, "L": L, "1/eps": pytest.approx(10.0)}
    assert i1["constant"] == res.UNKNOWN and i2["poly_degree"] == res.UNKNOWN
    # eq. II.95/II.96 divide by ||A|| eps_le
    assert res.log_term(0.5, [0, 0, 0.3, 0.1], 0.6, eps_le=0.01) == pytest.approx(
        2 / math.log(2) * math.log(2.5 / 0.01), rel=1e-12)
    # tomography m^2 r^3 / eps^2 = 4 * 27 / 0.01 = 10800; state prep r * ceil(log2 n) = 3 * 2
    assert res.tomography_cost(2, 3, 0.1) == pytest.approx(10800.0)
    assert res.sparse_state_prep_cost(3, 4) == 6
    assert res.sparse_state_prep_cost(3, 5) == 9
    # eq. II.83 and the general bound: (1 + 0.5)(1 + 0.5 + 0.25 + 0.125) = 2.8125
    assert res.kappa_bound_dissipative(3) == 8.0
    assert res.kappa_bound_general(0.5, 3) == pytest.approx(2.8125)
    # eq. II.77 and II.94 prefactors: s kappa and s^2 kappa_a^2; log2(N_h/eps) = log2(80/0.1)
    q77 = res.qlsa_complexity(5, 8.0, 80, 0.1)
    q94 = res.qlsa_complexity(5, 8.0, 80, 0.1, truncated=True)
    assert q77["prefactor"] == 40.0 and q94["prefactor"] == 1600.0
    assert q77["log2_Nh_over_eps"] == pytest.approx(math.log2(800))


def test_sparsity_and_condition_number():
    M = sp.csr_matrix(np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [3.0, 4.0, 5.0]]))
    assert res.sparsity(M) == 3  # row 2 and column 1 both have 3 entries
    assert res.sparsity(np.diag([1.0, 2.0])) == 1
    A = np.array([[2.0, 1.0], [0.0, 0.5]])
    assert res.condition_number(A) == pytest.approx(np.linalg.cond(A))
    # a dissipative block system obeys kappa <= 2(T+1) (eq. II.83)
    T, IA = 4, np.diag([0.5, -0.3, 0.9])
    blocks = np.eye(3 * (T + 1))
    for t in range(T):
        blocks[3 * (t + 1):3 * (t + 2), 3 * t:3 * (t + 1)] = -IA
    assert res.condition_number(blocks) <= res.kappa_bound_dissipative(T)


def test_model_table_for_the_paper_models():
    rows = {r["model"]: r for r in res.model_table()}
    small, big = rows["resnet32-w4"], rows["resnet56-w11"]
    assert small["n"] == 7_451_044 and big["n"] == 103_703_700
    assert small["r"] == 745_104 and big["r"] == 10_370_370
    assert small["m"] == 23 and big["m"] == 27  # 2^22 < 7.45e6 < 2^23, 2^26 < 1.04e8 < 2^27
    assert small["Delta"] == 7_451_044 + 7_451_044**2
    assert small["system_qubits"] == res.qubits_for(101 * small["Delta"]) + 1
    assert small["tomography"] == pytest.approx(23**2 * 745_104**3 / 1e-4)
    assert small["state_prep"] == 745_104 * 23
    assert small["s"] == res.UNKNOWN and small["prefactor_I1"] == 2 * 100
    with_s = res.model_table(s=10)[0]
    assert with_s["prefactor_I1"] == 10 * 2 * 100 and with_s["prefactor_I2"] == (10 * 2 * 100) ** 2


def test_bad_inputs_raise_user_error():
    with pytest.raises(UserError, match="n must"):
        res.system_qubits(0, 2, 3)
    with pytest.raises(UserError, match="< 1"):
        res.log_term(1.5, [0, 0, 1.0], 1.0)
    with pytest.raises(UserError, match="theorem"):
        res.gate_complexity("II.3", 1, 1, 1, 1, 0.1)
    with pytest.raises(UserError, match="eps"):
        res.tomography_cost(2, 3, 0.0)
    with pytest.raises(UserError, match="density"):
        res.model_table(density=0.0)
