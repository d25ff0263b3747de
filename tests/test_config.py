import pytest

from tokencredit.config import ConfigError, dump_config, load_config, option_help, build_config


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 3.0e-5\nrollout:\n  n: 6\n")
    cfg = load_config(f, ["rollout.n=8", "batching.reward_balance.tau=0.5", "token_weights.band=[0.1, 0.3]", "algo.dual_clip=3"])
    assert cfg.train.lr == 3e-5  # from the file
    assert cfg.rollout.n == 8  # the override wins
    assert cfg.batching.reward_balance.tau == 0.5
    assert cfg.token_weights.band == (0.1, 0.3)
    assert cfg.algo.dual_clip == 3.0
    # round trip through YAML
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("train.lr=abc", "'train.lr'"),
        ("train.lr=-1", "'train.lr'"),
        ("rollout.n=0", "'rollout.n'"),
        ("batching.planner=nope", "valid:"),
        ("algo.dual_clip=0.5", "dual_clip must be > 1"),
        ("token_weights.band=[0.5, 0.2]", "token_weights.band"),
        ("noequals", "key=value"),
        ("algo.loss_agg=sum", "'algo.loss_agg'"),
    ],
)
def test_bad_values_give_one_clear_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)
    unk = tmp_path / "unk.yaml"
    unk.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="'trian': unknown key"):
        load_config(unk)


def test_every_option_has_help():
    rows = option_help()
    assert len(rows) > 40
    for key, _default, help_ in rows:
        assert help_, f"{key} has no help text"


def test_shipped_configs_validate():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))
    assert files, "configs/ is empty"
    for f in files:
        load_config(f)


def test_default_yaml_is_the_builtin_default():
    from pathlib import Path

    from tokencredit.config import Config

    import yaml

    from tokencredit.config import _leaf_paths

    f = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    assert load_config(f) == Config()

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from (leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"])

    # every option is written out, none is left to a silent default
    assert sorted(leaves(yaml.safe_load(f.read_text()))) == sorted(_leaf_paths(Config))
