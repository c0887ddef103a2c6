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
