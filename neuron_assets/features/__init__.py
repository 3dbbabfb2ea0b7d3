"""What a feature is: an MLP neuron read at its site, or a latent of a sparse autoencoder
(an encoder over that site's activations, :mod:`neuron_assets.features.sae`)."""
