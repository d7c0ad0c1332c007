"""What a teacher or a student is, as settings: architecture, weights, preprocessing (no torch needed to read
or check one; :mod:`darkstore.models` builds and loads the model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

WeightFormat = Literal["auto", "safetensors", "state_dict", "torchscript", "export", "transformers"]
CODE_FORMATS = ("torchscript", "export")


class Preprocess(BaseModel):
    """What a model does to its input before the forward pass, on the device.

    Inputs arrive as float tensors (images in [0, 1], ``[B, C, H, W]``; arrays as
    stored). ``channels`` repeats a 1-channel image to 3 channels; ``resize``
    resamples images to an exact size (bilinear, antialiased); ``short_side`` and
    ``crop`` are the standard evaluation transform (shorter side to S, aspect kept,
    then a centre crop); ``mean``/``std`` normalise per channel (images) or per
    feature / globally (flat vectors).
    """

    model_config = ConfigDict(extra="forbid")
    preset: str | None = Field(None, description="the evaluation transform published with a model's weights, "
                               "by name: torchvision/<Weights>.<NAME> (e.g. torchvision/ResNet50_Weights."
                               "IMAGENET1K_V2) or timm/<model> (timm's pretrained config). It fills short_side, "
                               "crop, interpolation, mean and std; options given beside it win")
    channels: int | None = Field(None, ge=1)
    resize: int | tuple[int, int] | None = Field(None, description="resample to exactly this size (squashes: the "
                                                 "aspect ratio is not kept)")
    short_side: int | None = Field(None, ge=1, description="resize so the shorter side is this many pixels, keeping "
                                   "the aspect ratio (torchvision's Resize(int))")
    crop: int | tuple[int, int] | None = Field(None, description="then centre-crop to this size (CenterCrop)")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = Field(
        "bilinear", description="short_side's resampling (antialiased except nearest)")
    mean: list[float] | None = None
    std: list[float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("preset"), str) and data["preset"]:
            from .imaging import preset_values  # imports torchvision (or timm): only when a preset is named

            given = {k: v for k, v in data.items() if v is not None}
            data = {**preset_values(data["preset"]), **given}
        return data

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # options added after job keys existed are written only when set: older jobs keep their keys
        d = handler(self)
        for k, default in (("preset", None), ("short_side", None), ("crop", None), ("interpolation", "bilinear")):
            if k in d and d[k] == default:
                del d[k]
        return d

    @model_validator(mode="after")
    def _check(self) -> "Preprocess":
        if self.resize is not None and self.short_side is not None:
            raise ValueError("give resize (an exact size) or short_side (the shorter side, aspect kept), not both")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        if self.mean is not None and len(self.mean) != len(self.std or []):
            raise ValueError("mean and std must have the same length")
        return self


class EngineSpec(BaseModel):
    """A teacher served by an inference engine: a running vLLM server's OpenAI-compatible API. darkstore sends it
    token ids, never text, and asks for the top-K log-probabilities of every position of the prompt
    (``prompt_logprobs``). See the engines page of the docs."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["vllm"] = Field("vllm", description="the engine: vllm (its OpenAI-compatible server, or vllm.LLM "
                                  "in this process)")
    url: str | None = Field(None, description="a running server's address, e.g. http://gpu-node:8000 (with or "
                            "without /v1)")
    engine_args: dict[str, Any] | None = Field(
        None, description="instead of url: the engine in this process, vllm.LLM(**engine_args) (model, "
        "tensor_parallel_size, dtype, max_logprobs, max_model_len, ...), for a process that owns its GPUs; "
        "needs vllm installed beside darkstore")
    model: str | None = Field(None, description="the served model's name (--served-model-name); default: the "
                              "server's one model")
    api_key_env: str | None = Field(None, description="the environment variable holding the server's API key "
                                    "(--api-key); the key itself never goes in a job file")
    max_in_flight: int = Field(8, ge=1, le=1024, description="requests this process keeps open at once")
    rows_per_request: int = Field(4, ge=1, le=1024, description="rows (prompts) sent in one request")
    timeout_s: float = Field(300.0, gt=0, description="one request's time limit, in seconds")
    retry_for_s: float = Field(600.0, ge=0, description="how long a failing request (connection lost, 5xx, "
                               "429) is retried before the job stops: a restarting server costs only time")
    reference_rows: int = Field(4, ge=0, description="rows of the job's first chunk scored again by the same "
                                "model through transformers (the member's weights: a local directory) and "
                                "compared; 0: no comparison")
    max_kl: float = Field(0.05, gt=0, description="the largest mean KL per token (nats) between the engine and "
                          "the reference before the job stops")

    @model_validator(mode="after")
    def _url(self) -> "EngineSpec":
        if (self.url is None) == (self.engine_args is None):
            raise ValueError("an engine takes url (a running server) or engine_args (vllm.LLM in this process), "
                             "one of them")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"engine url {self.url!r}: give http://HOST:PORT or https://HOST:PORT")
        if self.engine_args is not None and not self.engine_args.get("model"):
            raise ValueError("engine_args needs model: the model's directory (or name) vllm.LLM loads")
        return self


class ModelSpec(BaseModel):
    """A teacher (ensemble member) or a student.

    Either ``arch`` (+ optional ``weights``), a causal language model saved by ``transformers`` (``format:
    transformers`` with ``weights`` its local directory), a code-carrying source: ``format:
    torchscript|export`` with ``weights``, or ``factory: module:function``; or, for a language-model teacher,
    an ``engine`` serving it (``weights`` then optional: the same model's local directory, the reference the
    engine is checked against).
    """

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    num_classes: int | None = Field(None, gt=1)
    weights: str | None = None
    format: WeightFormat = "auto"
    factory: str | None = None
    preprocess: Preprocess = Field(default_factory=Preprocess)
    tokenizer: str | None = Field(
        None, description="language models: the tokenizer the model was trained with (a local directory or "
        "tokenizer.json), checked against the transfer set's; a transformers directory's own by default")
    engine: EngineSpec | None = Field(
        None, description="language-model teachers: an inference engine serving the model (a vLLM server: url, "
        "model, api_key_env); weights, if given, are the same model's local transformers directory, the "
        "reference the engine's first rows are checked against")
    key_map: dict[str, str] = Field(
        default_factory=dict, description="rename weight keys before loading, by prefix: {'module.': ''} drops DDP's "
        "prefix; {'0.': 'net.1.', '2.': 'net.3.'} loads a plain nn.Sequential MLP into the built-in mlp. The longest "
        "matching prefix wins; loading stays strict")

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.engine is not None:
            return self._check_engine()
        sources = sum([self.arch is not None, self.factory is not None,
                       self.format in (*CODE_FORMATS, "transformers")])
        if sources != 1:
            raise ValueError("give exactly one of: arch, factory, or format torchscript/export/transformers with "
                             "weights, or an engine")
        if self.format in (*CODE_FORMATS, "transformers") and not self.weights:
            raise ValueError(f"format {self.format} needs weights: the file to load")
        return self

    def _check_engine(self) -> "ModelSpec":
        if self.arch is not None or self.factory is not None or self.format in CODE_FORMATS:
            raise ValueError("an engine teacher takes no arch, factory or code format: the engine runs the model "
                             "(weights, if given, are its local transformers directory: the reference)")
        if self.weights and self.format == "auto":
            self.format = "transformers"
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelSpec":
        """A spec file (YAML/JSON); a relative ``weights`` path is relative to the file, as in an ensemble file."""
        from .specfile import load_spec_file

        path = Path(path)
        return cls.model_validate(load_spec_file(path)).rebased(path.resolve().parent)

    def rebased(self, base: Path) -> "ModelSpec":
        """Relative file paths (weights, tokenizer) made relative to ``base``."""
        update = {k: str(base / v) for k in ("weights", "tokenizer")
                  if (v := getattr(self, k)) and not Path(v).is_absolute()}
        return self.model_copy(update=update) if update else self

    @property
    def label(self) -> str:
        if self.name or self.arch or self.factory:
            return self.name or self.arch or self.factory  # type: ignore[return-value]
        return self.engine.kind if self.engine and not self.weights else Path(self.weights or "model").stem


