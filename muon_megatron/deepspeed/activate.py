"""Importing this module calls :func:`muon_megatron.deepspeed.install`: from then on
``deepspeed.initialize`` with ``"optimizer": {"type": "muon"}`` builds muon_megatron's Muon."""

from .activation import install

install()
