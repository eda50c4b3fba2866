"""TFDS builder for the Planet chips (a package, as TFDS expects builders)."""

from rf_jax.data.tfds_planet.planet_amazon import (  # noqa: F401
    PlanetAmazon,
    TEST_MAPPING_FILE,
    load_builder,
    make_config,
)
