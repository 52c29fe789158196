"""The DFT water folder is found in both DeePMD layouts (by the demo and the study alike)."""
import pytest

from maskpot.dft_water import dft_water_inputs


def make_systems(root, names):
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "type.raw").write_text("0\n")


@pytest.mark.parametrize("under", ["", "data"])
def test_systems_directly_or_under_data_are_split_train_train_val_test(tmp_path, under):
    make_systems(tmp_path / under if under else tmp_path, [f"data_{i}" for i in range(4)])
    inputs = dft_water_inputs(tmp_path, "--dft-water")
    base = tmp_path / under if under else tmp_path
    assert inputs == [f"train={base / 'data_0'}", f"train={base / 'data_1'}", f"val={base / 'data_2'}",
                      f"test={base / 'data_3'}"]


def test_a_missing_system_names_the_setting_and_the_system(tmp_path):
    make_systems(tmp_path, ["data_0", "data_1", "data_2"])
    with pytest.raises(FileNotFoundError) as err:
        dft_water_inputs(tmp_path, "dft_water.path", hint="set dft_water.enabled=false to skip this setting")
    message = str(err.value)
    assert message.startswith(f"dft_water.path {tmp_path}:") and "data_3" in message and "enabled=false" in message
