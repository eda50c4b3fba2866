"""TFDS builder for the Planet chips (a package, as TFDS expects builders)."""

from rf_jax.data.tfds_planet.planet_amazon import (  # noqa: F401
    FORMAT_VERSION,
    PlanetAmazon,
    PlanetConfig,
    TEST_MAPPING_FILE,
    load_builder,
    make_config,
    source_layout,
)
