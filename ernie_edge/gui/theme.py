"""Light and dark looks: a Fusion palette, one small style sheet, and the colors the Markdown
HTML uses. "system" follows the desktop's color scheme where Qt can read it."""

from __future__ import annotations

from dataclasses import dataclass

from PyQt6.QtCore import Qt
from PyQt6.QtGui import QColor, QFont, QPalette
from PyQt6.QtWidgets import QApplication

from .render import DARK, LIGHT, Colors

# Fonts tried in order; Qt falls back per glyph, so CJK text finds WenQuanYi / Noto CJK.
UI_FONTS = ["Inter", "Segoe UI", "Noto Sans", "DejaVu Sans", "WenQuanYi Micro Hei", "Noto Sans CJK SC",
            "Microsoft YaHei", "PingFang SC"]
MONO_FONTS = ["JetBrains Mono", "DejaVu Sans Mono", "Consolas", "Menlo", "Noto Sans Mono CJK SC"]


@dataclass(frozen=True)
class Theme:
    name: str
    window: str
    base: str
    text: str
    muted: str
    accent: str
    button: str  # the primary button's background (white text on it)
    sidebar: str
    user_bubble: str
    border: str
    banner_bg: str
    banner_text: str
    html: Colors


LIGHT_THEME = Theme("light", window="#ffffff", base="#ffffff", text="#1f2328", muted="#6a737d",
                    accent="#2463eb", button="#2463eb", sidebar="#f6f7f9", user_bubble="#eef2fb", border="#d9dce1",
                    banner_bg="#fff4e5", banner_text="#7a4100", html=LIGHT)
DARK_THEME = Theme("dark", window="#17191d", base="#1e2127", text="#e6e8eb", muted="#9aa3ad",
                   accent="#6ea8fe", button="#2f5fc4", sidebar="#111316", user_bubble="#26303f", border="#343a42",
                   banner_bg="#3b2a12", banner_text="#ffd8a8", html=DARK)


def resolve_theme(name: str) -> Theme:
    if name == "dark":
        return DARK_THEME
    if name == "light":
        return LIGHT_THEME
    hints = QApplication.styleHints()
    scheme = getattr(hints, "colorScheme", lambda: None)()
    return DARK_THEME if scheme == Qt.ColorScheme.Dark else LIGHT_THEME


def apply_theme(app: QApplication, theme: Theme) -> None:
    app.setStyle("Fusion")
    font = QFont()
    font.setFamilies(UI_FONTS)
    font.setPointSize(10)
    app.setFont(font)
    p = QPalette()
    roles = {
        QPalette.ColorRole.Window: theme.window, QPalette.ColorRole.Base: theme.base,
        QPalette.ColorRole.AlternateBase: theme.sidebar, QPalette.ColorRole.WindowText: theme.text,
        QPalette.ColorRole.Text: theme.text, QPalette.ColorRole.Button: theme.sidebar,
        QPalette.ColorRole.ButtonText: theme.text, QPalette.ColorRole.Highlight: theme.button,
        QPalette.ColorRole.HighlightedText: "#ffffff", QPalette.ColorRole.Link: theme.accent,
        QPalette.ColorRole.ToolTipBase: theme.base, QPalette.ColorRole.ToolTipText: theme.text,
        QPalette.ColorRole.PlaceholderText: theme.muted, QPalette.ColorRole.Mid: theme.border,
    }
    for role, color in roles.items():
        p.setColor(role, QColor(color))
    p.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.Text, QColor(theme.muted))
    p.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.ButtonText, QColor(theme.muted))
    app.setPalette(p)
    app.setStyleSheet(style_sheet(theme))


def style_sheet(t: Theme) -> str:
    mono = ", ".join(f'"{f}"' for f in MONO_FONTS)
    return f"""
    QPushButton {{ border: 1px solid {t.border}; border-radius: 6px; padding: 4px 10px; background: {t.base}; }}
    QPushButton:hover, QPushButton:focus {{ border: 1px solid {t.accent}; }}
    QToolButton:focus {{ border: 1px solid {t.accent}; border-radius: 4px; }}
    #sidebar QLineEdit {{ border: 1px solid {t.border}; border-radius: 6px; padding: 4px 6px; background: {t.base}; }}
    #sidebar QLineEdit:focus {{ border: 1px solid {t.accent}; }}
    #sidebar {{ background: {t.sidebar}; border-right: 1px solid {t.border}; }}
    #sidebar QListWidget {{ background: {t.sidebar}; border: none; }}
    #sidebar QListWidget::item {{ padding: 6px 8px; border-radius: 6px; }}
    #sidebar QListWidget::item:selected {{ background: {t.user_bubble}; color: {t.text}; }}
    #header {{ border-bottom: 1px solid {t.border}; }}
    #title {{ font-size: 12pt; font-weight: 600; }}
    #chatArea, #chatInner {{ background: {t.base}; }}
    #message[role="user"] {{ background: {t.user_bubble}; border-radius: 10px; }}
    #role {{ font-weight: 600; }}
    #muted, #stats {{ color: {t.muted}; }}
    #thinkingToggle {{ color: {t.muted}; border: none; text-align: left; padding: 2px 0; }}
    #thinkingBody {{ color: {t.muted}; border-left: 2px solid {t.border}; padding-left: 8px; }}
    #toolCall {{ font-family: {mono}; background: {t.sidebar}; border: 1px solid {t.border};
                 border-radius: 6px; padding: 4px 6px; }}
    #banner {{ background: {t.banner_bg}; border-bottom: 1px solid {t.border}; }}
    #banner QLabel {{ color: {t.banner_text}; }}
    #composer {{ border-top: 1px solid {t.border}; }}
    #composer QPlainTextEdit {{ border: 1px solid {t.border}; border-radius: 8px; padding: 6px;
                                background: {t.base}; }}
    #composer QPlainTextEdit:focus {{ border: 1px solid {t.accent}; }}
    QPushButton#primary {{ background: {t.button}; color: white; border: none; border-radius: 6px;
                           padding: 6px 14px; font-weight: 600; }}
    QPushButton#primary:focus {{ border: 2px solid {t.text}; }}
    QPushButton#primary:disabled {{ background: {t.border}; color: {t.muted}; }}
    #welcome QLabel#welcomeTitle {{ font-size: 18pt; font-weight: 600; }}
    QToolButton#link {{ border: none; color: {t.muted}; padding: 0 4px; }}
    QToolButton#link:hover {{ color: {t.accent}; }}
    """
