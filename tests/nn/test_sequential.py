"""Sequential: parameter layout, (un)flattening, initialisation and shape checks."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

import ghess


@pytest.fixture
def model():
    return ghess.Sequential(ghess.Linear(3, 4), ghess.ReLU(), ghess.Linear(4, 2, bias=False),
                            ghess.Tanh(), ghess.Linear(2, 5), input_shape=(3,))


def test_layout_is_pytorchs(model):
    assert list(model.param_slots) == ["0.weight", "0.bias", "2.weight", "4.weight", "4.bias"]
    assert model.n_params == 12 + 4 + 8 + 10 + 5
    assert model.n_outputs == 5
    theta = np.arange(model.n_params, dtype=float)
    params = model.unflatten(theta)
    assert params["0.weight"].shape == (4, 3)
    assert_array_equal(params["0.weight"][1], [3.0, 4.0, 5.0])  # C order, weight first
    assert_array_equal(params["0.bias"], [12.0, 13.0, 14.0, 15.0])
    assert params["2.weight"].shape == (2, 4)
    assert_array_equal(model.flatten(params), theta)
    params["4.bias"][0] = -1.0  # views write through
    assert theta[-5] == -1.0


def test_flatten_rejects_wrong_keys_and_shapes(model):
    params = model.unflatten(np.zeros(model.n_params))
    with pytest.raises(ValueError, match="missing"):
        model.flatten({k: v for k, v in params.items() if k != "0.bias"})
    params["0.weight"] = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"0.weight must have shape \(4, 3\)"):
        model.flatten(params)


def test_init_params_follows_pytorch_bounds(model):
    theta = model.init_params(seed=0)
    assert theta.dtype == np.float64
    params = model.unflatten(theta)
    for name, fan_in in (("0.weight", 3), ("0.bias", 3), ("2.weight", 4), ("4.weight", 2)):
        values = params[name]
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(values).max() <= bound
        assert np.abs(values).max() > 0.5 * bound
    assert model.init_params(seed=1, dtype=np.float32).dtype == np.float32
    assert_array_equal(model.init_params(seed=3), model.init_params(seed=3))
    assert not np.array_equal(model.init_params(seed=3), model.init_params(seed=4))


def test_layers_must_chain():
    with pytest.raises(ValueError, match=r"layer 2: .*expects 5 input features.*produces 4"):
        ghess.Sequential(ghess.Linear(3, 4), ghess.ReLU(), ghess.Linear(5, 2), input_shape=(3,))
    with pytest.raises(ValueError, match="layer 0: .*expects 3 input features.*produces 7"):
        ghess.Sequential(ghess.Linear(3, 4), input_shape=(7,))


def test_layer_arguments_are_checked():
    with pytest.raises(ValueError, match="out_features must be positive"):
        ghess.Linear(3, 0)
    with pytest.raises(TypeError, match="in_features must be an int"):
        ghess.Linear(3.5, 2)
    with pytest.raises(TypeError, match="bias must be a bool"):
        ghess.Linear(3, 2, bias="yes")
    with pytest.raises(ValueError, match="negative_slope must be finite"):
        ghess.LeakyReLU(float("nan"))
    with pytest.raises(ValueError, match="beta must be positive"):
        ghess.Softplus(beta=0)
    with pytest.raises(TypeError, match="layer 1 must be a ghess layer"):
        ghess.Sequential(ghess.Linear(3, 2), "relu", input_shape=(3,))
    with pytest.raises(ValueError, match="at least one layer"):
        ghess.Sequential(input_shape=(3,))
    with pytest.raises(ValueError, match="input_shape"):
        ghess.Sequential(ghess.Linear(3, 2), input_shape=(0,))


def test_installed_modules_are_all_present():
    """Every module must be listed in meson.build, or the wheel silently lacks it.

    Imports every module of the source tree from the installed package, and
    checks the typing marker and the version are installed too.
    """
    import importlib.metadata
    from pathlib import Path

    source = Path(__file__).resolve().parents[2] / "src" / "ghess"
    names = sorted(
        ".".join(("ghess",) + path.relative_to(source).with_suffix("").parts)
        .removesuffix(".__init__")
        for path in source.rglob("*.py") if path.name != "__main__.py")  # runs the demo
    assert "ghess.nn.base" in names and "ghess._engine.plan" in names
    for name in names + ["ghess._version", "ghess._kernels.dense", "ghess._kernels.conv",
                         "ghess._kernels.blas", "ghess._kernels.alloc"]:
        importlib.import_module(name)
    installed = Path(ghess.__file__).parent
    assert (installed / "py.typed").is_file() and (installed / "__main__.py").is_file()
    assert ghess.__version__ == importlib.metadata.version("ghess")


def test_show_config_reports_openmp_and_threads(capsys):
    ghess.show_config()
    out = capsys.readouterr().out
    assert "OpenMP:" in out and "threads:" in out and "numpy:" in out
