"""`ec-lora-t app`: a local web page to steer generation with the engagement and time sliders.

Needs the optional extra (`pip install -e .[app]`, Gradio). The page has a prompt, the two
sliders of the vector (normalised engagement and time, both in [0, 1]), raw likes, comments
and a post date that the saved normalisation statistics turn into slider positions, a seed,
and the mode (EC-LoRA-T, the same LoRA with the ECM off, or the base model). The pipeline is
loaded once, when the page is built; each click generates one image through
`ec_lora_t.generation.generate_images` (the `ECLoRAStableDiffusionPipeline`), exactly as
`ec-lora-t generate` would. Every setting of the sliders acts: vector guidance works with text
guidance 1 too (two UNet rows, `ec_lora_t.pipeline`), so no slider position is silently ignored.

Two API endpoints come with the page (what `gradio_client` calls): `/generate` (prompt,
engagement, time, seed, mode, steps, guidance -> image, description) and `/vector` (likes,
comments, date -> engagement, time, description).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ec_lora_t.models import quiet_loading

# No usage reports from a local tool; set before gradio is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MODES = {"EC-LoRA-T": "ec_lora", "plain LoRA (ECM off)": "plain_lora", "base model": "base"}
DEFAULT_PROMPT = "(democreator style) (summer)"  # the generic caption of the embedded demo
DISPLAY_SIZE = 384  # px: small models draw 32 px images, shown enlarged with nearest-neighbour
# The evaluate stage's default (params.yaml evaluate.vector_guidance): what the README's numbers measured.
DEFAULT_VECTOR_GUIDANCE = 4.0


@dataclass
class SliderPage:
    """What the page's callbacks share: the pipeline (loaded once) and the statistics."""

    pipeline: Any  # ec_lora_t.pipeline.ECLoRAStableDiffusionPipeline
    normalizer: Any | None  # ec_lora_t.data.features.EngagementTimeNormalizer, None without statistics

    def generate(self, prompt: str, engagement: float, time: float, seed: float, mode: str = "EC-LoRA-T",
                 steps: float = 20, guidance_scale: float = 5.0,
                 vector_guidance: float = DEFAULT_VECTOR_GUIDANCE) -> tuple[Image.Image, str]:
        """One image for (prompt, vector, seed) in `mode`, enlarged for the page, and a description."""
        from ec_lora_t.generation import VectorSampling, generate_images

        mode_name = MODES[mode]
        vector = torch.tensor([[float(engagement), float(time)]])
        image = generate_images(
            self.pipeline, [prompt], vector if mode_name == "ec_lora" else None, [int(seed)],
            num_inference_steps=int(steps), guidance_scale=float(guidance_scale), mode=mode_name,
            sampling=VectorSampling(vector_guidance=float(vector_guidance)),
        )[0]
        scale = max(1, DISPLAY_SIZE // max(image.size))
        shown = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        vector_text = f"engagement {float(engagement):.2f}, time {float(time):.2f}" if mode_name == "ec_lora" else "no vector"
        return shown, f"{mode} · {vector_text} · seed {int(seed)} · {image.width}x{image.height} px, shown x{scale}"

    def vector(self, likes: float, comments: float, date: str, signals: str = "") -> tuple[float, float, str]:
        """Slider positions for raw likes, comments (or other `signals`, "saves=40, reach=3000",
        for an engagement of other signals) and a date, with how they were computed."""
        if self.normalizer is None:
            raise ValueError("no normalisation statistics were given (--stats); use the sliders")
        from ec_lora_t.data.normalizer import parse_signal_values

        date = (date or "").strip() or None
        raw = {"signals": parse_signal_values(signals)} if (signals or "").strip() else {"likes": likes, "comments": comments}
        query = self.normalizer.query(date=date, **raw)
        # Rounded to the sliders' step, so the slider shows what the description says.
        engagement, time = (round(float(v), 2) for v in query.vector)
        clipped = [name for name, value in zip(("engagement", "time"), query.unclipped) if not 0.0 <= float(value) <= 1.0]
        note = f" (outside the training range: {', '.join(clipped)} clipped to [0, 1])" if clipped else ""
        given = ", ".join(f"{name} {value:g}" for name, value in query.signals)
        return engagement, time, (
            f"{self.normalizer.formula} ({given}) = {query.total_engagement:g} "
            f"-> engagement {engagement:.2f}; {date or 'latest training post'} -> time {time:.2f}{note}"
        )


def load_slider_page(pretrained: str, adapter_dir: str | Path, stats: str | Path | None,
                     device: str | None = None) -> SliderPage:
    """Load the pipeline with the adapter (once) and the normalisation statistics when they exist."""
    from ec_lora_t.data.features import EngagementTimeNormalizer

    with quiet_loading():
        from ec_lora_t.generation import load_pipeline

        pipeline = load_pipeline(pretrained, adapter_dir, device=device)
    normalizer = EngagementTimeNormalizer.from_json(stats) if stats is not None and Path(stats).is_file() else None
    return SliderPage(pipeline=pipeline, normalizer=normalizer)


def build_app(page: SliderPage, steps: int = 20, guidance_scale: float = 5.0):
    """The Gradio page (a `gr.Blocks`) around a loaded `SliderPage`."""
    import gradio as gr

    with gr.Blocks(title="EC-LoRA-T") as app:
        gr.Markdown(
            "## EC-LoRA-T\nGenerate with a chosen **engagement** (how well a post did, 0 = the feed's "
            "weakest, 1 = its best) and **time** (0 = the first post, 1 = the latest)."
        )
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT)
                engagement = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Engagement (normalised)")
                time = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Time (normalised)")
                with gr.Accordion("Raw likes, comments and date", open=page.normalizer is not None):
                    with gr.Row():
                        likes = gr.Number(value=1000, label="Likes", minimum=0)
                        comments = gr.Number(value=30, label="Comments", minimum=0)
                        date = gr.Textbox(label="Date (ISO, e.g. 2025-06-01; empty: latest post)", value="")
                    other_signals = gr.Textbox(
                        label="Or other signals (name=value, ..., e.g. saves=40, reach=3000), for an engagement of "
                              + (page.normalizer.formula if page.normalizer is not None else "other signals"), value="")
                    to_sliders = gr.Button("Set the sliders from these", interactive=page.normalizer is not None)
                    conversion = gr.Markdown()
                with gr.Row():
                    seed = gr.Number(value=42, precision=0, label="Seed")
                    mode = gr.Radio(list(MODES), value="EC-LoRA-T", label="Mode")
                with gr.Accordion("Sampling", open=False):
                    steps_slider = gr.Slider(1, 100, value=steps, step=1, label="Steps")
                    guidance = gr.Slider(1.0, 15.0, value=guidance_scale, step=0.5, label="Guidance scale")
                    vector_guidance = gr.Slider(
                        1.0, 8.0, value=DEFAULT_VECTOR_GUIDANCE, step=0.5,
                        label="Vector guidance (1: none, what an exported LoRA reproduces; 4: the evaluated default)")
                run = gr.Button("Generate", variant="primary")
            with gr.Column():
                image = gr.Image(label="Generated image", type="pil", format="png", height=DISPLAY_SIZE)
                description = gr.Markdown()
        inputs = [prompt, engagement, time, seed, mode, steps_slider, guidance, vector_guidance]
        run.click(page.generate, inputs, [image, description], api_name="generate")
        # Letting go of a slider generates again (about a second per image on a CPU for the demo).
        for slider in (engagement, time):
            slider.release(page.generate, inputs, [image, description], api_name=False)
        to_sliders.click(page.vector, [likes, comments, date, other_signals], [engagement, time, conversion], api_name="vector")
    return app


def run_app(pretrained: str, adapter_dir: str | Path, stats: str | Path | None, host: str = "127.0.0.1",
            port: int = 7860, steps: int = 20, guidance_scale: float = 5.0, device: str | None = None) -> None:
    """The `ec-lora-t app` core: load once, then serve the page on host:port until stopped."""
    page = load_slider_page(pretrained, adapter_dir, stats, device=device)
    app = build_app(page, steps=steps, guidance_scale=guidance_scale)
    # quiet: no advice about public share links, which this local tool never makes
    app.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True, quiet=True,
               prevent_thread_lock=True)
    print(f"EC-LoRA-T slider page: {app.local_url} (Ctrl+C to stop)", flush=True)
    app.block_thread()
