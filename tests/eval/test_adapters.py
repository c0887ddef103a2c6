"""The VLMEvalKit adapter (through its message contract) and the training callback (through a real fit)."""

import os

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from kelix.eval.base import DataError
from kelix.eval.vlmevalkit import KelixVLM


@pytest.fixture
def pictures(tmp_path):
    paths = []
    for i, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        img = Image.new("RGB", (60 + 10 * i, 44), "white")
        img.paste(color, (8, 8, 40, 36))
        img.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    return paths


def test_vlmevalkit_generate_inner_contract(pipe, pictures):
    vlm = KelixVLM(pipe, max_new_tokens=6)
    assert not vlm.use_custom_prompt("MMBench_DEV_EN") and not vlm.is_api
    msg = [{"type": "image", "value": pictures[0]}, {"type": "text", "value": "Question: what colour?"},
           {"type": "text", "value": "Answer briefly."}]
    expected = pipe.understand(Image.open(pictures[0]), "Question: what colour?\nAnswer briefly.", max_new_tokens=6)
    assert vlm.generate_inner(msg, dataset="MMBench_DEV_EN") == expected == vlm.generate(msg)
    two = [{"type": "image", "value": p} for p in pictures] + [{"type": "text", "value": "Compare."}]
    assert vlm.generate_inner(two) == pipe.understand([Image.open(p) for p in pictures], "Compare.", max_new_tokens=6)
    assert vlm.generate_inner("Hello?") == pipe.understand([], "Hello?", max_new_tokens=6)
    assert vlm.batch_generate([msg, two, "Hello?"]) == [vlm.generate_inner(m) for m in (msg, two, "Hello?")]
    with pytest.raises(DataError, match="message part 0: type 'video' is not 'text' or 'image'"):
        vlm.generate_inner([{"type": "video", "value": "x.mp4"}])


class VLMEvalKitDataset:
    """What VLMEvalKit's ``infer_data`` holds of a dataset: ``dataset_name``, ``dump_image(line)`` (image
    files of a row) and ``build_prompt(line)`` (``ImageMCQDataset.build_prompt``, MMMU's split included),
    here over a TSV read by the kit."""

    def __init__(self, name, bench, items, root):
        self.dataset_name, self.items, self.root = name, {it.id: it for it in items}, root

    def dump_image(self, line):
        paths = []
        for j, src in enumerate(self.items[line["index"]].meta["row_images"]):
            path = os.path.join(self.root, f"{line['index']}_{j}.png")
            Image.open(__import__("io").BytesIO(src)).save(path)
            paths.append(path)
        return paths

    def build_prompt(self, line):
        it = self.items[line["index"]]
        paths = self.dump_image(line)
        text = it.prompt  # ImageMCQDataset.build_prompt's text (tested against the reference in test_readers)
        msgs = [{"type": "image", "value": p} for p in paths] + [{"type": "text", "value": text}]
        if "<image " not in text:
            return msgs
        segs = text.split("<image ")  # MMMUDataset.split_MMMU
        out = [{"type": "text", "value": segs[0]}]
        for seg in segs[1:]:
            out += [{"type": "image", "value": paths[int(seg[0]) - 1]}, {"type": "text", "value": seg[2:]}]
        return out


def test_vlmevalkit_infer_data_calls(pipeline_dir, pipe, tmp_path):
    """Every call VLMEvalKit's infer_data (vlmeval/inference.py, e8e78f0) makes on a local model, in order."""
    from functools import partial

    from kelix.eval import get_benchmark
    from kelix.eval.runner import PipelineModel, _load
    from tests.eval.test_readers import b64png, write_tsv

    rows = [dict(index=1, image=str([b64png(), b64png((0, 200, 0))]), question="<image 2> or <image 1>: which is red?",
                 A="left", B="right", answer="A", category="Art"),
            dict(index=2, image=b64png((0, 0, 200)), question="Which colour?", A="red", B="blue", answer="B",
                 category="Art")]
    data = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", rows)
    bench = get_benchmark("mmmu")
    items = bench.read(data)
    from kelix.eval.tsv import read_tsv, row_images

    for it, srcs in zip(items, row_images(read_tsv(data, ("index",)), data, None)):
        it.meta["row_images"] = srcs
    dataset = VLMEvalKitDataset("MMMU_DEV_VAL", bench, items, str(tmp_path))
    for key in ("pretrained", "pipeline"):  # supported_VLM["kelix"] = partial(KelixVLM, <key>=DIR)
        model = partial(KelixVLM, **{key: pipeline_dir}, max_new_tokens=6)()
        assert getattr(model, "is_api", False) is False
        model.set_dump_image(dataset.dump_image)
        assert model.dump_image({"index": 2}, "MMMU_DEV_VAL") == [str(tmp_path / "2_0.png")]
        assert hasattr(model, "use_custom_prompt") and model.use_custom_prompt("MMMU_DEV_VAL") is False
        assert not hasattr(model, "split_thinking")  # VLMEvalKit then uses its own
        for it in items:
            struct = dataset.build_prompt({"index": it.id})
            response = model.generate(message=struct, dataset="MMMU_DEV_VAL")
            # the same request kelix eval run makes for the row: images where the marks stand
            assert response == PipelineModel(pipe).answer([(_load(it, data), it.meta["segments"])], 6)[0]
    interleaved = dataset.build_prompt({"index": 1})
    images, texts = model.request(interleaved)
    assert texts == items[0].meta["segments"] and len(images) == 2
    assert model.check_content("hi") == "str" and model.check_content([{"type": "text", "value": "x"}]) == "listdict"
    assert model.preproc_content(["Describe.", str(tmp_path / "2_0.png")]) == [
        {"type": "text", "value": "Describe."}, {"type": "image", "value": str(tmp_path / "2_0.png")}]
    assert model.generate(["Describe.", str(tmp_path / "2_0.png")]) == model.generate(
        [{"type": "text", "value": "Describe."}, {"type": "image", "value": str(tmp_path / "2_0.png")}])
    with pytest.raises(ValueError, match="give the pipeline directory as pretrained=DIR"):
        KelixVLM()


def test_interleaved_document_places_each_image(pipe):
    from kelix.eval.runner import prompt_doc
    from kelix.llm.generate import understanding_doc

    lm = pipe.lm
    codes = list(pipe.tokenizer.encode([Image.new("RGB", (32, 32), "red")]))
    assert prompt_doc(lm, ["", "Q?"], codes).tokens == understanding_doc(lm, "Q?", codes).tokens
    doc = prompt_doc(lm, ["Left ", " right?"], codes)
    plain = understanding_doc(lm, "Left  right?", codes).tokens
    assert sorted(doc.tokens) == sorted(plain) and doc.tokens != plain  # the same blocks, the image moved
    header = lm.layout.chat_header("user")
    assert doc.tokens[:len(header) + len(lm.layout.text("Left "))] == header + lm.layout.text("Left ")
    with pytest.raises(ValueError, match="2 texts for 2 image"):
        prompt_doc(lm, ["a", "b"], codes * 2)


def test_vlmevalkit_adapter_imports_without_vlmevalkit():
    import subprocess
    import sys

    # vlmeval blocked from importing: the adapter needs none of it
    code = "import sys; sys.modules['vlmeval'] = None; import kelix.eval.vlmevalkit as m; print(m.KelixVLM.__name__)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "KelixVLM\n"


class Holder(pl.LightningModule):
    """The smallest module the callback serves: an ``lm`` (never trained here) and its image tokenizer."""

    def __init__(self, llm_dir, tok_dir):
        super().__init__()
        from kelix.llm.model import KelixLM

        self.lm = KelixLM.from_pretrained(llm_dir).train()
        self.image_tokenizer_path = tok_dir
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        assert self.lm.training  # the callback hands the model back in training mode
        return ((self.w - batch.float().mean()) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)


def test_eval_callback_logs_scores_to_tensorboard(pipeline_dir, pipe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader

    from kelix.eval import get_benchmark
    from kelix.eval.callback import EvalCallback
    from kelix.eval.runner import PipelineModel, run

    data = str(tmp_path / "bench")
    cb = EvalCallback(data=data, benchmarks=["synthetic-vqa", "synthetic-ocr"], every_n_steps=2, limit=3, batch_size=2)
    module = Holder(os.path.join(pipeline_dir, "llm"), os.path.join(pipeline_dir, "tokenizer"))
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=logger, callbacks=[cb], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, DataLoader(torch.arange(8), batch_size=1))
    events = EventAccumulator(logger.log_dir).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval/synthetic-vqa/acc", "eval/synthetic-ocr/exact", "eval/synthetic-ocr/char_acc"} <= tags
    assert [e.step for e in events.Scalars("eval/synthetic-vqa/acc")] == [2, 4]
    # the logged numbers are what kelix eval run gives with the same weights on the same items
    for name, metric in (("synthetic-vqa", "acc"), ("synthetic-ocr", "char_acc")):
        bench = get_benchmark(name)
        want = run(PipelineModel(pipe), bench, bench.read(data)[:3], str(tmp_path / name), data, progress=False)
        assert events.Scalars(f"eval/{name}/{metric}")[-1].value == pytest.approx(want["overall"][metric])


def test_eval_callback_rejects_generation_benchmarks():
    from kelix.eval.callback import EvalCallback

    with pytest.raises(ValueError, match="'synthetic-t2i' generates images"):
        EvalCallback(benchmarks=["synthetic-t2i"])
