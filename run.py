"""The single entry point: ``python run.py adapter=lora model=llama7b`` (``-m`` for sweeps)."""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

os.environ.setdefault("ADAPTERS_LAB_ROOT", str(Path(__file__).resolve().parent))

from adapters_lab.checks import ConfigKeyError, check_moved_overrides  # noqa: E402
from adapters_lab.config import register_configs  # noqa: E402
from adapters_lab.errors import USER_ERRORS  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from adapters_lab.pipeline import run

    try:
        return run(cfg)
    except USER_ERRORS as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweep records this job as failed (adapters_lab.sweep) and runs the others
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    try:  # a key that moved (trainer.val_set_size): one line naming its new place, not Hydra's composition error
        check_moved_overrides(sys.argv[1:])
    except ConfigKeyError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    main()
    from adapters_lab.training.settings import close_process_group  # noqa: E402

    close_process_group()  # under torchrun, after a run that ended well: the group torn down in every process
