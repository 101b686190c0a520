"""What a model was trained on, stage by stage: each run records its lines (data.path, how many, their licence as
prepare_pages.py found it) after the stages of the model it started from (train.init_from), in its checkpoints and
run_info.json; export.py carries the list into the model folder, whose card lists every stage, and a run started
from that folder carries it on. Pretrain on synthetic lines, then on a French corpus, fine-tune on yours: the card
names all three with their licences."""
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from htr.corpus_licence import data_licence
from utils import read_json

KEY = "training_data"                                 # in checkpoints, run_info.json and a model folder's config.yaml
MAX_STAGES = 32                                       # init_from chains followed through run directories


def stage_record(cfg, train_lines: int) -> dict:
    """This run's stage: its run name, data.path, train lines (after data.train_fraction) and their licence."""
    return {"run": cfg.model.run_name, "data": str(cfg.data.path), "train_lines": train_lines,
            "licence": data_licence(cfg.data.path)}


def recorded_stages(ckpt: dict, path) -> list:
    """The stages a checkpoint or model folder (read_model_folder's dict) records, oldest first. A checkpoint from
    before the record gives them rebuilt from its run directory (run_stages); a folder without the record, none."""
    if KEY in ckpt:
        return list(ckpt[KEY])
    return run_stages(Path(path).parent, ckpt["config"]) if "config" in ckpt else []


def run_stages(run_dir: Path, config: dict, depth: int = 0) -> list:
    """The stages of a run directory written before the record: its own, from its config and run_info.json, after
    those of the run its init_from names, followed as long as that run's directory is there."""
    info = read_json(run_dir / "run_info.json")
    earlier, init = [], info.get("init_from")
    if init and depth < MAX_STAGES and (Path(init).parent / "config.yaml").is_file():
        try:
            init_config = OmegaConf.to_container(OmegaConf.load(Path(init).parent / "config.yaml"))
            earlier = run_stages(Path(init).parent, init_config, depth + 1)
        except (OmegaConfBaseException, OSError, ValueError, AttributeError):
            earlier = []
    return [*earlier, {"run": config.get("model", {}).get("run_name"), "data": str(config.get("data", {}).get("path")),
                       "train_lines": info.get("train_lines"), "licence": info.get("data_licence")}]
