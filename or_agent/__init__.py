"""or-agent: surgical video decision-support edge agent.

The one import package the distribution installs. Its subpackages keep the repository's top-level
folders (``agent/``, ``pipelines/``, ``proto/``, ``calibration/``, ``synth/``, ``models/``), mapped
under this name by ``setup.py``'s ``package_dir``, so they cannot collide with other distributions'
top-level names (Google's ``proto-plus`` also installs ``proto``).
"""

__version__ = "0.1.0"
