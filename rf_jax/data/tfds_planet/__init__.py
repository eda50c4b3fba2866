"""TFDS builders for the Planet chips (a package, as TFDS expects builders):
`planet_amazon` (train, validation) and `planet_amazon_test` (test chips)."""

from rf_jax.data.tfds_planet.planet_amazon import (  # noqa: F401
    PlanetAmazon,
    load_builder,
    make_config,
)
from rf_jax.data.tfds_planet.planet_amazon_test import (  # noqa: F401
    PlanetAmazonTest,
    TEST_DIR,
    TEST_MAPPING_FILE,
    list_test_chips,
    load_test_builder,
    make_test_config,
)
