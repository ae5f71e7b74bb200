"""Integrations of kdfast with other libraries: :mod:`kdfast.integrations.transformers`."""
