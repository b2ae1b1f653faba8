"""Evaluate a checkpoint (ours or an authors' release file) on data.root/val, plus the efficiency table:
`python eval.py model=litv2_s checkpoint=litv2_s.pth data.root=/datasets/imagenet`
`python eval.py model=litv2_s profile_only=true`   (params, GFLOPs, img/s, memory; no data needed)
"""
import hydra

from litv2.engine import main_guard


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg):
    from litv2.engine import run_eval

    return main_guard(run_eval, cfg)


if __name__ == "__main__":
    main()
