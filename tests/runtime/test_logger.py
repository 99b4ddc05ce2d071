"""MetricWriter's log.jsonl and setup_logging's handlers."""
import json
import logging

from utils.runtime.logger import MetricWriter, setup_logging


def test_metric_writer_appends_one_json_line_per_record(tmp_path):
    writer = MetricWriter(str(tmp_path), use_tensorboard=False)
    writer.write({"type": "train", "iteration": 1, "loss": 1.5}, step=1)
    writer.write({"type": "eval", "iteration": 2, "AP": None}, step=2)
    writer.close()
    writer = MetricWriter(str(tmp_path), use_tensorboard=False)  # a resumed run appends
    writer.write({"type": "train", "iteration": 3, "loss": 0.5})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"type": "train", "iteration": 1, "loss": 1.5},
                                                    {"type": "eval", "iteration": 2, "AP": None},
                                                    {"type": "train", "iteration": 3, "loss": 0.5}]


def test_setup_logging_replaces_only_its_own_handlers(tmp_path):
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    try:
        setup_logging(str(tmp_path))
        setup_logging(str(tmp_path))
        own = [h for h in root.handlers if getattr(h, "_from_setup_logging", False)]
        assert len(own) == 2 and foreign in root.handlers  # stdout + train.log, once each
        logging.getLogger("train").info("hello log file")
        for handler in own:
            handler.flush()
        assert "hello log file" in (tmp_path / "train.log").read_text()
    finally:
        for handler in list(root.handlers):
            if getattr(handler, "_from_setup_logging", False) or handler is foreign:
                root.removeHandler(handler)
