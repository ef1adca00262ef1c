"""--preset: the three int4 recipes of the measured front, and how explicit options and small models adjust them."""
import pytest

from export.quantize import DEFAULT_PRESET, PRESETS, QuantSpec
from toolkit.errors import ArgumentError


def test_default_is_the_balanced_preset():
    assert DEFAULT_PRESET == "balanced"
    spec = QuantSpec.recommended(4)
    assert (spec.method, spec.symmetric, spec.group_size, spec.lm_head_bits, spec.lm_head_group_size) == \
        ("compensated", False, 64, 4, 64)
    assert spec.accuracy_level == 4


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_int4_recipes_that_options_override(preset):
    spec = QuantSpec.recommended(4, preset=preset)
    for key, value in PRESETS[preset].items():
        assert getattr(spec, key) == value
    assert QuantSpec.recommended(4, preset=preset, group_size=32, method="rtn").group_size == 32
    assert QuantSpec.recommended(4, preset=preset, method="rtn").method == "rtn"


def test_preset_errors_name_the_option():
    with pytest.raises(ArgumentError, match="--preset fastest: expected one of fast, balanced, accurate"):
        QuantSpec.recommended(4, preset="fastest")
    with pytest.raises(ArgumentError, match="--preset fast: the presets are int4 recipes; expected --bits 4"):
        QuantSpec.recommended(8, preset="fast")


def test_fit_shrinks_defaulted_groups_for_a_small_model():
    fast = QuantSpec.recommended(4, preset="fast").fit(64, 96)  # hidden 64, intermediate 96
    assert fast.group_size == 32 and fast.lm_head_group_size == 64 and fast.embed_group_size == 64
    given = QuantSpec.recommended(4, preset="fast", group_size=16).fit(64, 96)
    assert given.group_size == 16  # an explicit group size is never changed (check_group_sizes reports a misfit)


def test_cli_preset_reaches_the_spec(monkeypatch, tmp_path, capsys):
    from click.testing import CliRunner

    import export
    from toolkit.cli import cli, main

    seen = {}
    monkeypatch.setattr(export, "export", lambda src, out, spec, **kw: seen.setdefault("spec", spec))
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "src"), str(tmp_path / "out"), "--preset", "accurate"])
    assert result.exit_code == 0, result.output
    assert seen["spec"].group_size == 32 and seen["spec"].lm_head_bits == 8
    with pytest.raises(SystemExit) as exit_:
        main(["export", "a", "b", "--bits", "8", "--preset", "fast"])
    assert exit_.value.code == 2
    assert "error: --preset fast: the presets are int4 recipes; expected --bits 4 (got 8)" in capsys.readouterr().err
