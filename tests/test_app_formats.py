"""Every embeddings file the trainer writes, checked against each app's loading rule.

Each rule below restates, as a check on a file, what that app's own loader does. It was learned by reading the
loader in the app's public repository (named in each rule); no app code is copied. A rule returns the prompt word the
app would give the embedding and fails with the app's reason where the app would refuse the file or misread it.
diffusers' rule is diffusers itself: its `load_textual_inversion` runs on the files here.

Widths: the tiny SD pipeline's text encoder is 32 wide (768 in SD 1.x); the tiny SDXL's are 32 (clip_l) and 48
(clip_g; 1280 in SDXL). A rule checks against the widths of the model the file was trained for.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import train_argv
from safetensors.torch import load_file

import train_textual_inversion as tti


def read(path: Path) -> dict:
    """How every app opens a file: safetensors by extension, anything else through torch.load."""
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- AUTOMATIC1111 / Forge ------------------------------------------------------------------------------------------
# modules/safe.py: a .pt/.bin that is a zip may hold only these entries; one that is not (torch's legacy format) is
# unpickled with a RestrictedUnpickler that allows only these globals.
A1111_ZIP_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
A1111_GLOBALS = {
    "collections": {"OrderedDict"},
    "torch._utils": {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy"},
    "torch": {"FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage", "float32",
              "BFloat16Storage"},
    "torch.nn.modules.container": {"ParameterDict"},
    "numpy.core.multiarray": {"scalar", "_reconstruct"},
    "numpy": {"dtype", "ndarray"},
    "_codecs": {"encode"},
    "__builtin__": {"set"},
}


class A1111Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name not in A1111_GLOBALS.get(module, ()):
            raise AssertionError(f"AUTOMATIC1111 safe.py: global '{module}/{name}' is forbidden")
        return super().find_class(module, name)

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)  # an empty stand-in, as safe.py returns


def a1111_safe_unpickle(path: Path) -> None:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            bad = [n for n in archive.namelist() if not A1111_ZIP_ENTRY.match(n)]
        assert not bad, f"AUTOMATIC1111 safe.py: bad file inside {path.name}: {bad[0]}"
    else:  # legacy format: safe.py unpickles its first five records (magic, protocol, sys info, object, keys)
        with open(path, "rb") as file:
            unpickler = A1111Unpickler(file)
            for _ in range(5):
                unpickler.load()


def automatic1111(path: Path, widths: list[int]) -> str:
    """AUTOMATIC1111/stable-diffusion-webui: modules/textual_inversion/textual_inversion.py (load_from_file,
    create_embedding_from_data) and modules/safe.py. Forge inherits both."""
    assert path.suffix.upper() in (".PT", ".BIN", ".SAFETENSORS"), "AUTOMATIC1111 ignores this extension"
    if path.suffix != ".safetensors":
        a1111_safe_unpickle(path)
    data = read(path)
    if "string_to_param" in data:
        assert len(data["string_to_param"]) == 1, "embedding file has multiple terms in it"
        width = next(iter(data["string_to_param"].values())).shape[-1]
    elif isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
        assert all(isinstance(v, torch.Tensor) for v in data.values())
        width = data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
    else:
        assert type(next(iter(data.values()))) is torch.Tensor, "neither an embedding nor a diffusers concept"
        assert len(data) == 1, "embedding file has multiple terms in it"
        width = next(iter(data.values())).shape[-1]
    assert width == sum(widths), f"AUTOMATIC1111 skips it: width {width}, model {sum(widths)}"
    return path.stem


# ---- ComfyUI ---------------------------------------------------------------------------------------------------------
def comfyui(path: Path, widths: list[int]) -> str:
    """Comfy-Org/ComfyUI: comfy/sd1_clip.py (load_embed), with each text encoder's key from comfy/sd1_clip.py
    (clip_l) and comfy/sdxl_clip.py (clip_l, clip_g). Without the key it takes string_to_param or the first tensor.
    A tensor whose last dimension is not the encoder's width is dropped with a warning."""
    assert path.suffix in (".safetensors", ".pt", ".bin")
    data = read(path)
    for key, width in zip(["clip_l", "clip_g"], widths):
        if "string_to_param" in data:
            tensor = next(iter(data["string_to_param"].values()))
        else:
            tensor = data[key] if key in data else next(iter(data.values()))
        assert tensor.shape[-1] == width, f"ComfyUI ignores it for {key}: width {tensor.shape[-1]}, not {width}"
    return path.stem  # typed as embedding:<stem>


# ---- kohya sd-scripts ------------------------------------------------------------------------------------------------
def kohya(path: Path, widths: list[int], vocabulary: set[str]) -> str:
    """kohya-ss/sd-scripts: gen_img.py / sdxl_gen_img.py (--textual_inversion_embeddings). SD: the first tensor
    (after string_to_param); SDXL: data["clip_l"], data["clip_g"]. Rows are vectors, added as <stem>, <stem>1, ...;
    the stem must be new to the tokenizer."""
    data = read(path)
    data = data.get("string_to_param", data)
    tensors = [data["clip_l"], data["clip_g"]] if len(widths) == 2 else [next(iter(data.values()))]
    for tensor, width in zip(tensors, widths):
        assert tensor.ndim == 2 and tensor.shape[1] == width, f"kohya reads rows of width {width}: {tuple(tensor.shape)}"
    assert len({t.shape[0] for t in tensors}) == 1, "kohya pairs clip_l and clip_g rows"
    assert path.stem not in vocabulary, "kohya: the tokenizer already has this word"
    return path.stem


# ---- InvokeAI --------------------------------------------------------------------------------------------------------
def invokeai(path: Path, widths: list[int]) -> str:
    """invoke-ai/InvokeAI: the probe in invokeai/backend/model_manager/configs/textual_inversion.py
    (_file_looks_like_embedding, _get_base_or_raise) and the loader in invokeai/backend/textual_inversion.py. The
    probe reads the token width from string_to_param (with string_to_token), emb_params or clip_g by the last
    dimension, and of any other first tensor by shape[0]; it must be the base model's width."""
    data = read(path)
    looks = bool({"string_to_param", "emb_params", "clip_g"} & set(data)) or (
        len(data) < 10 and all(isinstance(v, torch.Tensor) for v in data.values()))
    assert looks, "InvokeAI: not an embedding"
    if "string_to_token" in data:
        width = next(iter(data["string_to_param"].values())).shape[-1]
    elif "emb_params" in data:
        width = data["emb_params"].shape[-1]
        assert data["emb_params"].ndim == 2, "InvokeAI does not unsqueeze emb_params"
    elif "clip_g" in data:
        width = data["clip_g"].shape[-1]
        assert "clip_l" in data, "InvokeAI's loader needs clip_l with clip_g"
    else:
        width = next(iter(data.values())).shape[0]
    assert width == widths[-1], f"InvokeAI: unrecognized token dimension {width}"
    assert re.fullmatch(r"[a-zA-Z0-9., _-]+", path.stem), "InvokeAI's <name> prompt syntax cannot name it"
    return path.stem  # typed as <stem>


# ---- the trainer's output --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outputs(tiny_pipeline, tiny_sdxl_pipeline, tmp_path_factory) -> dict[str, tuple[Path, list[int]]]:
    """Three runs as a user would make them: SD .safetensors (2 vectors), SD .bin, SDXL; all with --save_steps."""
    from accelerate.state import AcceleratorState, GradientState

    concept = Path(__file__).resolve().parents[1] / "examples" / "concept"
    runs = {"sd": (tiny_pipeline, ["--num_vectors", "2"], [32]),
            "sd-bin": (tiny_pipeline, ["--no_safe_serialization"], [32]),
            "sdxl": (tiny_sdxl_pipeline, ["--num_vectors", "2"], [32, 48])}
    folders = {}
    for name, (pipe, extra, widths) in runs.items():
        out = tmp_path_factory.mktemp(name) / "out"
        tti.main(tti.parse_args(train_argv(pipe, concept, out, "--max_train_steps", "2", "--save_steps", "1", *extra)))
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        folders[name] = (out, widths)
    return folders


def app_files(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_file() and p.name.startswith("cat-toy"))


@pytest.mark.parametrize("run", ["sd", "sd-bin", "sdxl"])
def test_the_apps_get_a_file_named_after_the_word_for_the_result_and_each_save(outputs, run):
    out, _ = outputs[run]
    ext = ".bin" if run == "sd-bin" else ".safetensors"
    # The result, each save, and the best step (the validation at the last step picks it).
    assert [p.name for p in app_files(out)] == [f"cat-toy-best{ext}", f"cat-toy-steps-1{ext}", f"cat-toy-steps-2{ext}",
                                                f"cat-toy{ext}"]
    diffusers_files = sorted(p.name for p in out.iterdir() if p.name.startswith("learned_embeds"))
    assert diffusers_files == [f"learned_embeds-best{ext}", f"learned_embeds-steps-1{ext}",
                               f"learned_embeds-steps-2{ext}", f"learned_embeds{ext}"]


@pytest.mark.parametrize("app", ["automatic1111", "comfyui", "kohya", "invokeai"])
@pytest.mark.parametrize("run", ["sd", "sd-bin", "sdxl"])
def test_every_app_reads_every_named_file(outputs, run, app, tiny_tokenizer):
    out, widths = outputs[run]
    rules = {"automatic1111": automatic1111, "comfyui": comfyui, "invokeai": invokeai,
             "kohya": lambda path, widths: kohya(path, widths, set(tiny_tokenizer.get_vocab()))}
    for path in app_files(out):
        assert rules[app](path, widths) == path.stem
        # Same vectors as the diffusers file of the same step.
        twin = read(out / path.name.replace("cat-toy", "learned_embeds"))
        ours = read(path)
        assert [torch.equal(a, b) for a, b in zip(twin.values(), ours.values())] == [True] * len(twin)


def test_the_rules_refuse_what_the_apps_refuse(outputs, tmp_path, tiny_tokenizer):
    """Each rule fails where its app fails on a file as it was written before (diffusers' own layout)."""
    out, widths = outputs["sd"]
    diffusers_layout = out / "learned_embeds.safetensors"  # {"<cat-toy>": [2, 32]}
    with pytest.raises(AssertionError, match="unrecognized token dimension 2"):
        invokeai(diffusers_layout, widths)
    zip_bin = tmp_path / "zip.bin"
    torch.save({"emb_params": torch.zeros(2, 32)}, zip_bin)  # torch >= 2.1's default zip format
    with pytest.raises(AssertionError, match="bad file inside"):
        automatic1111(zip_bin, widths)
    two_keys = tmp_path / "two.safetensors"
    tti.save_learned_embeds({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, two_keys)
    with pytest.raises(AssertionError, match="multiple terms"):
        automatic1111(two_keys, widths)
    with pytest.raises(AssertionError, match="already has this word"):
        kohya(_named(tmp_path, "toy"), widths, set(tiny_tokenizer.get_vocab()) | {"toy"})
    with pytest.raises(AssertionError, match="ComfyUI ignores"):
        comfyui(out / "cat-toy.safetensors", [32, 48])  # an SD file on SDXL


def _named(folder: Path, stem: str) -> Path:
    path = folder / f"{stem}.safetensors"
    tti.save_learned_embeds({"emb_params": torch.zeros(1, 32)}, path)
    return path


@pytest.mark.parametrize("run", ["sd", "sd-bin", "sdxl"])
def test_diffusers_and_load_learned_embeds_read_every_file(outputs, run, tiny_pipeline, tiny_sdxl_pipeline):
    """diffusers' own load_textual_inversion on the learned_embeds files, and the project's loader on all files with
    the token named by the metadata (.safetensors) or the file (.bin)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from generate import load_learned_embeds

    out, _ = outputs[run]
    sdxl = run == "sdxl"
    pipeline_class, folder = (StableDiffusionXLPipeline, tiny_sdxl_pipeline) if sdxl else (StableDiffusionPipeline,
                                                                                           tiny_pipeline)
    for path in sorted(p for p in out.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin")):
        pipe = pipeline_class.from_pretrained(folder)
        expected = "<cat-toy>" if path.suffix == ".safetensors" or path.stem.startswith("learned_embeds") else path.stem
        assert load_learned_embeds(pipe, path) == [expected]
        vectors = read(path)
        first = vectors["clip_l"] if sdxl else next(iter(vectors.values()))
        token_id = pipe.tokenizer.convert_tokens_to_ids(expected)
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], first[0])
        if not sdxl and path.stem.startswith("learned_embeds"):
            plain = pipeline_class.from_pretrained(folder)
            plain.load_textual_inversion(str(path))  # diffusers itself, no help from us
            assert plain.tokenizer.convert_tokens_to_ids("<cat-toy>") == token_id


def test_app_word():
    assert tti.app_word("<cat-toy>") == "cat-toy"
    assert tti.app_word("<my_style.v2>") == "my_style.v2"
    assert tti.app_word("s*") == "s"
    assert tti.app_word("<*>") == "embedding"
    assert tti.app_word("<learned_embeds>") == "learned_embeds-word"  # never overwrites diffusers' files


def test_app_layout():
    vectors = torch.ones(2, 32)
    assert tti.app_layout({"<cat-toy>": vectors}) == {"emb_params": vectors}
    pair = {"clip_l": torch.ones(2, 32), "clip_g": torch.ones(2, 48)}
    assert tti.app_layout(pair) == pair
