"""Train a model: `python train.py [experiment=litv2_s_in1k] [key=value ...]` (see README.md).

Thin by design: Hydra composes conf/config.yaml, litv2.engine.train does the work.
Multi-GPU: `torchrun --nproc-per-node=8 train.py ...`; sweeps: `python train.py -m hilo.alpha=0.5,0.9`.
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig

from litv2.engine import main_guard, rank_zero_hydra_overrides


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    from litv2.engine import train

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    owns_dir = hc.output_subdir is not None  # false on torchrun ranks > 0 (see rank_zero_hydra_overrides)
    return main_guard(train, cfg, run_dir=run_dir, fresh_dir=run_dir if owns_dir else None,
                      exit_code_on_signal=cfg.trainer.signal_exit_code)


if __name__ == "__main__":
    sys.argv = rank_zero_hydra_overrides(sys.argv)
    main()
