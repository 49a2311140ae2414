"""Suite-wide configuration: the ``slow`` marker.

``slow`` marks the test modules that start processes (the deepspeed launcher,
torchrun, ranks spawned by torch.multiprocessing, the command-line tools in a
subprocess) or audit thousands of canaries: most of the suite's time.
``./launch.sh test -m "not slow"`` runs the rest, the quick inner loop; the
README's test command runs everything.
"""

import pytest

SLOW_MODULES = frozenset({
    "test_data_fuzz", "test_data_tar_headers", "test_privacy_audit", "test_torch_compat",
    "test_trainer_agreement", "test_benchmarks_suite", "test_trainer_caption", "test_trainer_checkpoint",
    "test_trainer_checkpoint_safety", "test_trainer_config", "test_trainer_deepspeed", "test_trainer_distributed",
    "test_trainer_evaluate", "test_trainer_export", "test_trainer_faults", "test_trainer_finetune_cli",
    "test_benchmarks_gpu_check", "test_imports", "test_trainer_job", "test_trainer_own_data", "test_trainer_probe",
    "test_trainer_untrusted",
})


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes or audits many canaries (deselect: -m 'not slow')")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
