"""The CustomResourceDefinitions, shipped as package data (tideserve.crds) so the operator can read its own schema."""
