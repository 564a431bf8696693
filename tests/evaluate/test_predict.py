"""Prediction on new images (evaluation.py --input): prepared exactly as the training data, masks on the source grid
in the source format, scores only for labelled images, one broken image failing alone; and the command line with a
real (untrained) Keras model."""

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from builders import label_reader, write_msd

import evaluation
import utils.evaluate.predict
from utils.evaluate.options import Options
from utils.evaluate.predict import predict_images
from utils.prepared import PreparedDataset

QUIET = Options(pictures="none", metrics=["dice", "hd95"], progress=False)


def test_new_images_are_prepared_exactly_like_the_training_data(synthetic, tmp_path, monkeypatch):
    raw, dataset, run = synthetic
    prepared = {}
    original = utils.evaluate.predict.prepare_case

    def spy(case, *args, **options):
        assert case.label is None  # a crop to the foreground could otherwise see the truth
        assert options == {"release": True}  # without pictures the image is handed over and freed once resampled
        image, label, record = original(case, *args, **options)
        prepared[case.case_id] = (image, record)
        return image, label, record

    monkeypatch.setattr(utils.evaluate.predict, "prepare_case", spy)
    summary = predict_images(run, raw, tmp_path, options=QUIET, predict=label_reader)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert summary["num_scored"] == 8 and not summary["failures"]
    for case in manifest["cases"]:
        image, record = prepared[case["id"]]
        np.testing.assert_array_equal(image, np.load(dataset / case["image"]))
        assert record.to_json() == case["geometry"]
        truth = nib.load(PreparedDataset(dataset).spec(case["id"]).label)  # the manifest's paths are relative
        mask = nib.load(tmp_path / "masks" / f"{case['id']}.nii.gz")
        np.testing.assert_array_equal(mask.affine, truth.affine)
        assert mask.shape == truth.shape
    assert summary["classes"]["2"]["dice"]["mean"] == 1.0
    assert summary["settings"]["training_data"] == str(dataset.resolve())


def test_unlabelled_images_get_masks_and_volumes_but_no_scores(synthetic, tmp_path):
    _, _, run = synthetic
    raw = write_msd(tmp_path / "new", cases=0, unlabelled=2)
    summary = predict_images(run, raw, tmp_path / "out", options=Options(progress=False), predict=label_reader)
    assert summary["num_cases"] == 2 and summary["num_scored"] == 0 and summary["classes"] == {}
    for case_id in ("case_000", "case_001"):
        record = json.loads((tmp_path / "out" / "cases" / f"{case_id}.json").read_text())
        assert record["metrics"] is None and record["predicted_ml"]["2"] > record["predicted_ml"]["1"] > 0
        assert (tmp_path / "out" / "overlays" / f"{case_id}.gif").is_file()
    assert (tmp_path / "out" / "metrics.csv").read_text().strip() == "case,label,class"
    assert '<tr id="case-case_001">' in (tmp_path / "out" / "report.html").read_text()


def test_nrrd_inputs_get_nrrd_masks_with_the_source_geometry(synthetic, tmp_path):
    raw, _, run = synthetic
    folder = tmp_path / "nrrd"
    folder.mkdir()
    for index in (0, 3):
        for kind, sub in (("image", "imagesTr"), ("label", "labelsTr")):
            image = sitk.ReadImage(str(raw / sub / f"case_{index:03d}.nii.gz"))
            image.SetOrigin((5.0, -3.0, 12.5))
            sitk.WriteImage(image, str(folder / f"case_{index:03d}_{kind}.nrrd"))
    summary = predict_images(run, folder, tmp_path / "out", fmt="files", options=QUIET, predict=label_reader)
    assert summary["num_scored"] == 2 and summary["foreground_mean"]["dice"] == 1.0
    for index in (0, 3):
        written = sitk.ReadImage(str(tmp_path / "out" / "masks" / f"case_{index:03d}.nrrd"))
        source = sitk.ReadImage(str(folder / f"case_{index:03d}_label.nrrd"))
        for get in ("GetOrigin", "GetSpacing", "GetDirection"):  # NRRD stores direction x spacing: 1e-16 rounding
            np.testing.assert_allclose(getattr(written, get)(), getattr(source, get)(), rtol=0, atol=1e-12)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(source))


def test_a_broken_image_fails_alone(synthetic, tmp_path):
    _, _, run = synthetic
    raw = write_msd(tmp_path / "new", cases=0, unlabelled=3)
    (raw / "imagesTs" / "case_001.nii.gz").write_bytes(b"not a nifti file")
    summary = predict_images(run, raw, tmp_path / "out", options=QUIET, predict=label_reader)
    assert [f["id"] for f in summary["failures"]] == ["case_001"]
    assert "case_001.nii.gz" in summary["failures"][0]["error"]
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["case_000.nii.gz", "case_002.nii.gz"]


def test_the_training_dataset_must_be_found(synthetic, tmp_path):
    raw, _, run = synthetic
    with pytest.raises(FileNotFoundError, match="pass its folder with --data"):
        predict_images(run, raw, tmp_path, data=tmp_path / "moved", options=QUIET, predict=label_reader)


def test_command_line_with_a_real_model(synthetic, tmp_path, capsys):
    import model as model_zoo

    raw, dataset, template = synthetic
    run = tmp_path / "run"
    run.mkdir()
    config = json.loads((template / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config))
    network = model_zoo.build_model("unet3d", (8, 16, 16, 1), 3, filters=4, depth=2)
    network.save(run / "model.keras")
    new = write_msd(tmp_path / "new", cases=1, unlabelled=1)
    out = tmp_path / "out"
    flags = ["--pictures", "overlays", "--quiet", "--metrics", "dice", "--tta", "--postprocess", "lcc"]
    code = evaluation.main(["--run", str(run), "--input", str(new), "--output", str(out), *flags])
    assert code == 0, capsys.readouterr().err
    for case_id in ("case_000", "case_001"):
        mask = nib.load(out / "masks" / f"{case_id}.nii.gz")
        assert mask.shape == (16, 20, 12) and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
        assert (out / "overlays" / f"{case_id}.png").is_file() and not (out / "overlays" / f"{case_id}.gif").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_scored"] == 1 and summary["settings"]["tta"] is True
    assert summary["postprocessing"]["lcc_classes"] == [1, 2]


def test_command_line_errors_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluation.main(["--run", str(tmp_path), "--output", str(tmp_path / "out")])
    assert "give --data" in capsys.readouterr().err
    code = evaluation.main(["--run", str(tmp_path), "--input", str(tmp_path), "--output", "x", "--regions", "[1]"])
    assert code == 2 and "--regions must be a JSON object" in capsys.readouterr().err
    code = evaluation.main(["--run", str(tmp_path), "--data", str(tmp_path), "--output", "x", "--min-size", "5cm"])
    assert code == 2 and "--min-size takes a size" in capsys.readouterr().err
