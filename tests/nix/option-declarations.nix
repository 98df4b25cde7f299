# Lists the options a module of modules/ declares, with their descriptions,
# by calling the module function with a recording `lib`: mkOption returns its
# arguments and types are inert descriptions. This needs no nixpkgs, so it runs
# offline in CI; it sees declarations only. Their semantics (types, defaults,
# assertions, the rendered units) are checked with the real nixpkgs lib by
# tests/nix/eval-modules.nix.
{ module }:
let
  inherit (builtins)
    attrNames
    concatMap
    isAttrs
    isFunction
    ;

  type = name: extra: { stubType = name; } // extra;
  types = {
    anything = type "anything" { };
    bool = type "bool" { };
    package = type "package" { };
    path = type "path" { };
    externalPath = type "path not in the Nix store" { };
    port = type "port" { };
    str = type "str" { };
    ints.positive = type "positive int" { };
    ints.between = _lo: _hi: type "int between" { };
    strMatching = _pattern: type "str matching" { };
    nullOr = elem: type "null or" { inherit elem; };
    listOf = elem: type "list of" { inherit elem; };
    nonEmptyListOf = elem: type "non-empty list of" { inherit elem; };
    attrsOf = elem: type "attrs of" { inherit elem; };
    submodule = submodule: type "submodule" { inherit submodule; };
  };

  lib = {
    inherit types;
    mkOption = args: { option = args; };
    mkEnableOption = name: {
      option = {
        type = types.bool;
        description = "Whether to enable ${name}.";
      };
    };
    mkPackageOption = _pkgs: name: _: {
      option = {
        type = types.package;
        description = "The ${name} package to use.";
      };
    };
    literalExpression = text: {
      _type = "literalExpression";
      inherit text;
    };
  };

  args = {
    inherit lib;
    name = "<name>";
    pkgs.formats.json = _: { type = type "json" { }; };
    # Declarations must not depend on the configuration.
    config = throw "option declarations read `config`";
  };

  optionsOf = m: (if isFunction m then m args else m).options or { };

  # Options declared inside a submodule type, at path + the type's suffix.
  nested =
    path: t:
    if !(isAttrs t) || !(t ? stubType) then
      [ ]
    else if t.stubType == "submodule" then
      collect path (optionsOf t.submodule)
    else if t.stubType == "attrs of" then
      nested (path ++ [ "<name>" ]) t.elem
    else if t.stubType == "list of" || t.stubType == "non-empty list of" then
      nested (path ++ [ "*" ]) t.elem
    else if t ? elem then
      nested path t.elem
    else
      [ ];

  collect =
    path: decls:
    concatMap (
      n:
      let
        v = decls.${n};
        p = path ++ [ n ];
      in
      if v ? option then
        [
          {
            name = builtins.concatStringsSep "." p;
            description = v.option.description or null;
          }
        ]
        ++ nested p (v.option.type or null)
      else if isAttrs v then
        collect p v
      else
        [ ]
    ) (attrNames decls);
in
collect [ ] (optionsOf (import module))
