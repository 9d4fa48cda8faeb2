"""ParallelConfig: how one model is split over devices — tensor (tp), expert (ep), pipeline (pp) —
and how the workers are launched. Validated here against the launch only; against the model in
split.py, once config.json is read."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.errors import ConfigError

EXECUTORS = ("mp", "torchrun", "ray")


def parse_split(text: str | list | tuple | None, name: str, kind=int) -> list | None:
    """'10,14' -> [10, 14]; 'auto' and None stay as they are (None: even split)."""
    if text is None or isinstance(text, (list, tuple)):
        return list(text) if text is not None else None
    if text.strip() == "auto":
        return "auto"  # type: ignore[return-value]
    try:
        values = [kind(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{name} takes comma-separated numbers (e.g. 3,1) or 'auto', got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"{name} needs one positive number per rank, got {text!r}")
    return values


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel ranks per pipeline stage
    ep: int = 1  # expert-parallel ranks per pipeline stage (1, or equal to tp when tp > 1)
    pp: int = 1  # pipeline stages
    pp_layers: str | list[int] | None = None  # layers per stage: None even, [10, 14] explicit, "auto" measured
    ep_weights: str | list[float] | None = None  # expert share per EP rank: None even, [3, 1], "auto" measured
    executor: str = "mp"  # "mp": this process spawns its workers; "torchrun" / "ray": see executor.py
    collective_timeout: float = 120.0  # seconds a collective may wait before the engine fails
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port (mp); from the environment (torchrun)

    def __post_init__(self) -> None:
        for name in ("tp", "ep", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be an integer >= 1, got {value!r}")
        if self.tp > 1 and self.ep > 1 and self.tp != self.ep:
            raise ConfigError(
                f"--ep {self.ep} with --tp {self.tp}: expert parallelism runs over the tensor-parallel ranks of a "
                "stage, so give --ep equal to --tp (or one of them 1)"
            )
        self.pp_layers = parse_split(self.pp_layers, "--pp-layers", int)
        self.ep_weights = parse_split(self.ep_weights, "--ep-weights", float)
        if isinstance(self.pp_layers, list) and len(self.pp_layers) != self.pp:
            raise ConfigError(f"--pp-layers lists {len(self.pp_layers)} stages but --pp is {self.pp}")
        if isinstance(self.ep_weights, list) and len(self.ep_weights) != self.ep:
            raise ConfigError(f"--ep-weights lists {len(self.ep_weights)} ranks but --ep is {self.ep}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"unknown distributed executor {self.executor!r}; use one of {', '.join(EXECUTORS)}")
        if self.collective_timeout <= 0:
            raise ConfigError(f"collective_timeout must be > 0 seconds, got {self.collective_timeout}")

    @property
    def stage_size(self) -> int:
        """Ranks in one pipeline stage: the tensor- and expert-parallel group."""
        return max(self.tp, self.ep)

    @property
    def world_size(self) -> int:
        return self.stage_size * self.pp

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def add_parallel_arguments(parser) -> None:
    """--tp, --ep, --pp, --pp-layers, --ep-weights, --distributed-executor on generate, chat and serve."""
    group = parser.add_argument_group("many devices as one")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (split heads and MLPs)")
    group.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (split a MoE model's experts)")
    group.add_argument("--pp", type=int, default=1, help="pipeline stages (split the layers)")
    group.add_argument("--pp-layers", default=None, help="layers per stage, e.g. 10,14; auto: by measured speed")
    group.add_argument("--ep-weights", default=None, help="expert share per EP rank, e.g. 3,1; auto: by measured speed")
    group.add_argument("--distributed-executor", default="mp", choices=list(EXECUTORS),
                       help="mp: spawn workers on this host; torchrun: started by torchrun; ray: on a Ray cluster")
    group.add_argument("--collective-timeout", type=float, default=120.0,
                       help="seconds a worker may stay silent before the engine fails (default 120); joining "
                            "at start may take up to this or 120 s, whichever is longer")


def parallel_kwargs(args) -> dict:
    return dict(tp=args.tp, ep=args.ep, pp=args.pp, pp_layers=args.pp_layers, ep_weights=args.ep_weights,
                distributed_executor=args.distributed_executor, collective_timeout=args.collective_timeout)
