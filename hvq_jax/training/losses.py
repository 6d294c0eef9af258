"""Generator and discriminator losses (METHOD.md "Rate and loss")."""
import jax
import jax.numpy as jnp


def l1(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.abs(x - y))


def hinge_d(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])  (taming's hinge_d_loss)."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g(logits_fake: jax.Array) -> jax.Array:
  """-E[D(x_hat)]."""
  return -jnp.mean(logits_fake)


def adaptive_weight(grad_rec: jax.Array, grad_gan: jax.Array, max_weight: float = 1e4,
                    eps: float = 1e-4) -> jax.Array:
  """VQGAN's d_weight: ||dL_rec/dW_last|| / (||dL_gan/dW_last|| + eps), clipped, no gradient."""
  w = jnp.linalg.norm(grad_rec) / (jnp.linalg.norm(grad_gan) + eps)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))
